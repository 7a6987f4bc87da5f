"""`dwakd bench` on a tiny cross-tokenizer pair: step times after warm-up, memory readings, table, failures reported."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from _eval_helpers import make_tokenizer

from dwakd.cli import main
from dwakd.evaluation.efficiency import bench_one

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    make_tokenizer(300, root / "student_tok")
    make_tokenizer(420, root / "teacher_tok")
    tree = {
        "student": {"tokenizer": str(root / "student_tok"),
                    "tiny": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                             "intermediate_size": 64, "max_positions": 128}},
        "teacher": {"tokenizer": str(root / "teacher_tok"),
                    "tiny": {"arch": "llama", "hidden_size": 48, "num_layers": 1, "num_heads": 4,
                             "intermediate_size": 96, "max_positions": 128}, "seed": 1},
        "data": {"train": str(REPO / "data" / "dolly-tiny" / "train.jsonl"), "max_prompt_length": 32,
                 "max_length": 64},
        "method": {"name": "sft"},
        "training": {"output_dir": str(root / "run"), "use_cpu": True, "learning_rate": 1e-3},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_bench_one_measures_steps_after_warmup(tiny_config):
    tree = yaml.safe_load(tiny_config.read_text())
    started = time.perf_counter()
    result = bench_one(tree, "dwakd", 2, warmup=1, steps=3, sample_interval=0.002)
    elapsed = time.perf_counter() - started
    assert result.error is None, result.error
    assert len(result.step_seconds) == 3 and all(s > 0 for s in result.step_seconds)
    assert sorted(result.step_seconds)[1] == result.median_step_s
    assert sum(result.step_seconds) < elapsed  # measured steps are part of the whole call
    assert result.memory_kind == "process_rss" and 0 < result.avg_mem_gib <= result.peak_mem_gib < 64


def test_profiled_steps_come_after_the_measured_ones(tiny_config, tmp_path):
    """`profile_steps` more steps run under torch.profiler; their operator table is written, the timings and the
    memory readings still cover the measured steps only."""
    tree = yaml.safe_load(tiny_config.read_text())
    result = bench_one(tree, "sft", 2, warmup=1, steps=2, sample_interval=0.002, profile_steps=2,
                       profile_dir=tmp_path)
    assert result.error is None, result.error
    assert len(result.step_seconds) == 2
    assert result.profile == str(tmp_path / "profile_sft_bs2.txt")
    table = (tmp_path / "profile_sft_bs2.txt").read_text()
    assert table.startswith("2 profiled step(s)") and "aten::mm" in table and "Self CPU" in table


def test_bench_command_prints_table(tiny_config, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", str(tiny_config), "--methods", "sft", "no-such-method", "--batch-sizes", "2", "1",
                 "--warmup", "1", "--steps", "2", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 1  # one method failed; the others were still measured
    data = json.loads((out / "bench.json").read_text())
    results = data["results"]
    assert [(r["method"], r["batch_size"]) for r in results] == [
        ("sft", 2), ("no-such-method", 2), ("sft", 1), ("no-such-method", 1)]
    assert all((r["error"] is None) == (r["method"] != "no-such-method") for r in results)
    for r in results:
        if r["error"] is None:
            row = f"| {r['method']} | {r['avg_mem_gib']:.3f} | {r['peak_mem_gib']:.3f} | {r['median_step_s']:.3f} |"
            assert row in printed and len(r["step_seconds"]) == 2
    assert printed.count("*Batch size") == 2 and re.search(r"\| no-such-method \| failed: ", printed)
    assert (out / "bench.md").read_text() in printed
