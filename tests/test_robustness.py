"""Issue 9: multi-process training equals single-process, exact resume after SIGKILL/Ctrl-C, hostile inputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dwakd.cli import main

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


def losses(output_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(e["step"], e[key]) for e in state["log_history"] if "loss" in e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINES = {
    "ddp": [],
    "fsdp": ["training.fsdp=true", "training.fsdp_config={transformer_layer_cls_to_wrap: [GPT2Block]}",
             "training.save_strategy=steps", "training.save_steps=3"],
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_processes_on_cpu_equal_single_process(tiny_yaml, tmp_path, engine):
    """DDP / FSDP over 2 CPU processes (gloo), 2 per device == 1 process with 4: same loss and parts."""
    common = [str(tiny_yaml), *SMALL, "training.max_steps=3", "data.max_train_examples=24", "method=dskd"]
    single = tmp_path / "single"
    subprocess.run(cli(*common, f"output_dir={single}", "training.per_device_train_batch_size=4"),
                   env=env(), check=True, capture_output=True, timeout=300)
    multi = tmp_path / engine
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "--master_addr=127.0.0.1", "-m", "dwakd.cli", "train", *common, f"output_dir={multi}",
         "training.per_device_train_batch_size=2", "training.ddp_backend=gloo", *ENGINES[engine]],
        env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for key in ("loss", "ce", "t2s_ce", "s2t_kd", "t2s_acc"):  # the loss and the named parts, reduced over ranks
        a, b = losses(single, key), losses(multi, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        for (_, x), (_, y) in zip(a, b):
            assert y == pytest.approx(x, rel=1e-4), key
    if engine == "fsdp":  # the gathered checkpoint holds the student and the projectors, once
        from safetensors.torch import load_file

        ckpt = multi / "checkpoint-3"
        projectors = load_file(str(ckpt / "distill_method.safetensors"))
        reference = load_file(str(single / "distill_method.safetensors"))
        assert {k: v.shape for k, v in projectors.items()} == {k: v.shape for k, v in reference.items()}
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(ckpt))


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_then_resume_matches_uninterrupted(tiny_yaml, tmp_path):
    common = [str(tiny_yaml), *SMALL, "training.max_steps=8", "training.save_strategy=steps", "training.save_steps=2",
              "training.per_device_train_batch_size=2", "data.max_train_examples=32"]
    ref = tmp_path / "ref"
    subprocess.run(cli(*common, f"output_dir={ref}"), env=env(), check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(*common, f"output_dir={out}"), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (out / "checkpoint-4" / "trainer_state.json").is_file(), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # A save cut short by the kill: weights half written, no trainer_state.json. It must be skipped, not loaded.
    newest = max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=4)
    broken = out / f"checkpoint-{newest + 2}"
    broken.mkdir()
    good = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(good[: len(good) // 3])
    before = _digest(out / "checkpoint-4")

    resumed = subprocess.run(cli(*common, f"output_dir={out}", "training.resume_from_checkpoint=last"),
                             env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping incomplete checkpoint {broken}" in resumed.stderr
    assert _digest(out / "checkpoint-4") == before
    # the resumed run wrote that step again, completely
    from dwakd.checkpoints import checkpoint_problem

    assert checkpoint_problem(broken) is None
    ref_losses, got = losses(ref), losses(out)
    assert [s for s, _ in got] == [s for s, _ in ref_losses] == list(range(1, 9))
    for (step, x), (_, y) in zip(ref_losses, got):
        assert y == pytest.approx(x, rel=1e-5), f"step {step}"

    # naming a broken checkpoint explicitly is refused with the reason
    (broken / "trainer_state.json").write_text("{cut")
    assert main(["train", *[c for c in common if c != "--no-progress"], f"output_dir={out}",
                 f"training.resume_from_checkpoint={broken}"]) == 2


def test_ctrl_c_saves_checkpoint_then_resume_finishes(tiny_yaml, tmp_path):
    import threading

    out = tmp_path / "int"
    common = [str(tiny_yaml), *SMALL, "training.per_device_train_batch_size=2", "data.max_train_examples=16"]
    proc = subprocess.Popen(cli(*common, "training.max_steps=400", f"output_dir={out}"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        assert _wait_for(lambda: any("'loss'" in line for line in lines), proc), "training never started"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert any("interrupted at step" in line for line in lines)
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file()
    step = int(saved[0].name.split("-")[1])
    assert 0 < step < 400
    finish = subprocess.run(cli(*common, f"training.max_steps={step + 2}", f"output_dir={out}",
                                "training.resume_from_checkpoint=last"),
                            env=env(), capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert [s for s, _ in losses(out)][-2:] == [step + 1, step + 2]


# ---- hostile inputs: caught before training, message names the fix, nothing written is touched ----------

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
def test_hostile_inputs(tiny_yaml, tmp_path, capsys, problem, overrides, message):
    import _toy_method  # noqa: F401  (registers the toy projector method)

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
    started = time.time()
    code = main(["train", str(tiny_yaml), *SMALL[:-1], *resolved, f"output_dir={out}", "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert time.time() - started < 60
    assert _digest(out) == before
