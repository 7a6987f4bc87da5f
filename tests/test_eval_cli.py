"""`dwakd eval` end to end on the four paper test sets (small slices), with a full and a LoRA checkpoint."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from _eval_helpers import make_gpt2, make_tokenizer, save_checkpoint
from _kd_helpers import one_thread
from rouge_score import rouge_scorer

from dwakd.cli import main
from dwakd.data.records import load_records
from dwakd.evaluation.generation import GenerationSettings, generate_seed_file

# the first rows of the four paper test sets, in the MiniLLM --data-root layout (shipped with the tests)
PAPER_SETS = Path(__file__).resolve().parent / "data" / "paper-sets"
ARGS = ["--seeds", "10", "20", "--limit", "2", "--max-prompt-length", "48", "--max-length", "64",
        "--max-new-tokens", "10", "--batch-size", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models generate several times faster on one thread than on two busy ones (see one_thread)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = make_tokenizer()
    full = save_checkpoint(make_gpt2(tokenizer, seed=11), tokenizer, root / "full")
    base = save_checkpoint(make_gpt2(tokenizer, seed=12), tokenizer, root / "base")
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    torch.manual_seed(0)
    for name, param in lora.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it change the model
            torch.nn.init.normal_(param, std=0.5)
    lora.save_pretrained(root / "lora")
    tokenizer.save_pretrained(root / "lora")
    merged = lora.merge_and_unload().eval()
    return {"full": full, "lora": str(root / "lora"), "merged": merged, "tokenizer": tokenizer}


def test_eval_command_on_paper_sets(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", f"sft={checkpoints['full']}", "--model", f"lora={checkpoints['lora']}",
            "--data-root", str(PAPER_SETS), "--out-dir", str(out), *ARGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("dolly", "selfinst", "vicuna", "sni"):
        for model in ("sft", "lora"):
            for seed in (10, 20):
                lines = (out / "generations" / model / name / f"seed{seed}.jsonl").read_text().splitlines()
                rows = [json.loads(x) for x in lines]
                assert [r["index"] for r in rows] == [0, 1]
    for suffix in ("md", "csv", "png"):
        assert (out / f"report.{suffix}").is_file()

    # Every printed cell, recomputed from the generation files with rouge_score directly.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for model in ("sft", "lora"):
        per_dataset = {}
        for name in ("dolly", "selfinst", "vicuna", "sni"):
            per_seed = []
            for seed in (10, 20):
                lines = (out / "generations" / model / name / f"seed{seed}.jsonl").read_text().splitlines()
                rows = [json.loads(x) for x in lines]
                per_seed.append(statistics.fmean(
                    100 * max(scorer.score(ref, r["response"])["rougeL"].fmeasure for ref in r["references"])
                    for r in rows))
            per_dataset[name] = per_seed
        cells = [f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" for v in per_dataset.values()]
        avg = [statistics.fmean(vals) for vals in zip(*per_dataset.values())]
        cells.append(f"{statistics.fmean(avg):.2f} ± {statistics.stdev(avg):.2f}")
        assert f"| {model} | " + " | ".join(cells) + " |" in printed
    assert "| Method | Dolly | SelfInst | Vicuna | S-NI | Avg. |" in printed

    # The LoRA adapter dir was evaluated as base + adapter: same responses as the merged model in memory.
    records = load_records(PAPER_SETS / "vicuna" / "valid.jsonl")[:2]
    settings = GenerationSettings(max_prompt_length=48, max_length=64, max_new_tokens=10, batch_size=1)
    generate_seed_file(checkpoints["merged"], checkpoints["tokenizer"], records, 20, tmp_path / "merged.jsonl",
                       settings, progress=False)
    merged_lora = (out / "generations" / "lora" / "vicuna" / "seed20.jsonl").read_bytes()
    assert (tmp_path / "merged.jsonl").read_bytes() == merged_lora

    # A rerun resumes: nothing to generate, so no model is loaded, and the same table is printed.
    import dwakd.models

    original = dwakd.models.load_model_for_inference
    dwakd.models.load_model_for_inference = lambda *a, **k: pytest.fail("finished runs must not load models")
    try:
        assert main(argv) == 0
    finally:
        dwakd.models.load_model_for_inference = original
    assert capsys.readouterr().out.split("\n", 1)[1].split("wrote")[0] == printed.split("\n", 1)[1].split("wrote")[0]

    # Changed decoding settings with the same --out-dir are refused rather than mixed in.
    changed = [a if a != "10" or i != ARGS.index("--max-new-tokens") + 1 else "11" for i, a in enumerate(ARGS)]
    argv_changed = argv[: argv.index("--seeds")] + changed
    assert main(argv_changed) == 2
    assert "different settings" in capsys.readouterr().err


def test_eval_command_errors(tmp_path, capsys):
    assert main(["eval", "--model", "x=nowhere", "--dataset", "dolly", "--out-dir", str(tmp_path)]) == 2
    assert "data root" in capsys.readouterr().err
    assert main(["eval", "--model", "x=nowhere", "--out-dir", str(tmp_path)]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_context_length_checked(checkpoints, tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    # The tiny GPT-2 has 512 positions; 600 would overflow it.
    argv = ["eval", "--model", f"m={checkpoints['full']}", "--dataset", f"t={data}", "--out-dir", str(tmp_path / "o"),
            "--max-prompt-length", "300", "--max-length", "600", "--seeds", "1", "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    assert "positions" in capsys.readouterr().err
