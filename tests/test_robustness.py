"""Issue 9: multi-process training equals single-process; hostile inputs fail early with a clear message.

Kill/Ctrl-C and resume: tests/test_resume_exact.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwakd.cli import main
from dwakd.trainer import LOG_DECIMALS

REPO = Path(__file__).resolve().parents[1]

SMALL = [
    "student.tiny={arch: gpt2, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, "
    "max_positions: 128, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
    "data.max_length=48", "data.max_prompt_length=24", "data.eval=null", "training.logging_steps=1",
    "--no-progress",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dwakd.cli", "train", *args]


def env() -> dict:
    e = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


# Loss parts and statistics are logged rounded to LOG_DECIMALS: two runs whose values differ past that digit can log
# values one unit apart, and two such decimals differ in float by a hair over one unit (0.006234 - 0.006233 is
# 1.0000000000001327e-06), so a comparison of logged parts cannot be finer than this.
LOGGED_UNIT = 1.5 * 10.0**-LOG_DECIMALS


def losses(output_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(e["step"], e[key]) for e in state["log_history"] if "loss" in e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINES = {
    "ddp": [],
    # reentrant checkpointing (transformers 4.x's default) fails under DDP with find_unused_parameters
    "ddp-checkpointing": ["training.gradient_checkpointing=true"],
    "fsdp": ["training.fsdp=true", "training.fsdp_config={transformer_layer_cls_to_wrap: [GPT2Block]}",
             "training.save_strategy=steps", "training.save_steps=3"],
}
# dwakd with every term on (token weights, gate, banded Soft-DTW on hidden states and embeddings), a smaller teacher
DISTRIBUTED = [*SMALL, "method=dwakd", "training.max_steps=3", "data.max_train_examples=24",
               "method.projector_lr=1e-2",  # projectors move visibly each step: a wrong projector gradient shows
               "teacher.tiny={arch: qwen2, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
               "intermediate_size: 64, max_positions: 128}"]


def logged(output_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the training log entry of that step."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """The reference: one process, the same global batch of 4 in the same two micro-batches of 2 (accumulated).

    The same micro-batches, not one batch of 4: DSKD/DWA-KD normalise teacher embeddings and hidden states by
    their standard deviation over the micro-batch, so one batch of 4 is a different computation (measured: the
    query/t2s projectors differ by up to 1e-2 after 3 steps at projector_lr 1e-2).
    """
    import yaml
    from _kd_helpers import one_thread
    root = tmp_path_factory.mktemp("single")
    tree = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    tree["data"]["train"] = str(REPO / tree["data"]["train"])
    (root / "tiny.yaml").write_text(yaml.safe_dump(tree))
    out = root / "run"
    with one_thread():  # like the subprocesses (OMP_NUM_THREADS=1)
        assert main(["train", str(root / "tiny.yaml"), *DISTRIBUTED, f"output_dir={out}",
                     "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2"]) == 0
    return out


def assert_same_saved_values(folder: Path, reference: Path) -> None:
    """The saved student and projectors hold the reference's values (not just its names and shapes)."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "distill_method.safetensors"):
        got, want = load_file(str(folder / name)), load_file(str(reference / name))
        assert set(got) == set(want), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=f"{folder / name}: {key}")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_processes_on_cpu_equal_single_process(single_process, tiny_yaml, tmp_path, engine):
    """DDP / FSDP over 2 CPU processes (gloo), 2 sequences each == 1 process with the same 2 micro-batches:
    every logged number (loss, grad norm, learning rate, each loss part summed over ranks, each stat averaged
    over micro-batches, γ) and the saved student and projector values."""
    multi = tmp_path / engine
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "--master_addr=127.0.0.1", "-m", "dwakd.cli", "train", str(tiny_yaml), *DISTRIBUTED, f"output_dir={multi}",
         "training.per_device_train_batch_size=2", "training.ddp_backend=gloo", *ENGINES[engine]],
        env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    got, want = logged(multi), logged(single_process)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    parts = {"ce", "t2s_ce", "t2s_kd", "s2t_kd", "kd", "dtw_hidden", "dtw_embedding"}
    stats = {"student_weight_mean", "teacher_weight_mean", "gate_mean", "t2s_acc", "dtw_gamma"}
    for step in want:
        assert set(got[step]) == set(want[step]) >= parts | stats | {"loss", "grad_norm"}, step
        for key, value in want[step].items():  # parts and stats are logged rounded to 6 decimals
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-6), f"step {step}: {key}"
    assert_same_saved_values(multi, single_process)
    if engine == "fsdp":  # the gathered checkpoint holds the student and the projectors, once, with their values
        assert_same_saved_values(multi / "checkpoint-3", single_process)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(multi / "checkpoint-3"))


# ---- hostile inputs: caught before training, message names the fix, nothing written is touched ----------

def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _existing_output(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "existing"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"log_history": []}')
    (out / "notes.txt").write_text("keep me")
    return out, _digest(out)


@pytest.mark.parametrize("problem, overrides, message", [
    ("malformed row", ["data.train=@BAD"], "bad.jsonl, line 2: invalid JSON"),
    ("empty response", ["data.train=@EMPTY"], "empty.jsonl, line 1, field 'output': is empty"),
    ("bad value", ["data.max_length=8"], "data.max_prompt_length < data.max_length"),
    ("unknown key", ["training.gradient_accumulation=2"], "Did you mean 'training.gradient_accumulation_steps'"),
    ("length beyond positions", ["data.max_length=512"], "exceeds the student's 128 positions"),
    ("teacher needed", ["method=toy-projector-test", "teacher=null"], "needs a teacher"),
    ("tokenizer without EOS", ["student.tokenizer=@NOEOS"], "has no EOS token"),
    ("vocab bigger than embedding", ["student.tiny=null", "student.name_or_path=@SMALLVOCAB"],
     "tokenizer has 50257 tokens but the model's embedding has only 100 rows"),
])
def test_hostile_inputs(tiny_yaml, tmp_path, capsys, monkeypatch, problem, overrides, message):
    import _toy_method  # noqa: F401  (registers the toy projector method)

    import dwakd.run

    files = {}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    files["@BAD"] = str(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"instruction": "a", "output": ""}\n')
    files["@EMPTY"] = str(empty)
    if "@NOEOS" in " ".join(overrides):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
        tok.save_pretrained(str(tmp_path / "noeos"))
        files["@NOEOS"] = str(tmp_path / "noeos")
    if "@SMALLVOCAB" in " ".join(overrides):
        from dwakd.models import build_tiny_model

        build_tiny_model("gpt2", vocab_size=100, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                         max_positions=128).save_pretrained(str(tmp_path / "small"))
        files["@SMALLVOCAB"] = str(tmp_path / "small")
    resolved = [o.split("=", 1)[0] + "=" + files.get(o.split("=", 1)[1], o.split("=", 1)[1]) for o in overrides]
    out, before = _existing_output(tmp_path)

    # Caught before training starts, and before any model is built unless the check needs the model itself.
    def too_late(what):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{problem}: {what} before the error was raised")
        return refuse

    monkeypatch.setattr(dwakd.run, "DistillationTrainer", too_late("training was set up"))
    if problem not in ("length beyond positions", "vocab bigger than embedding"):
        monkeypatch.setattr(dwakd.run, "load_side_model", too_late("a model was loaded"))
    code = main(["train", str(tiny_yaml), *SMALL[:-1], *resolved, f"output_dir={out}", "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert _digest(out) == before
