"""Kill and resume `dwakd` training with dropout on: the resumed run equals the uninterrupted one exactly.

Dropout > 0 in the student makes every step consume random numbers, so a resume that does not restore the RNG
state (or the projectors, the optimizer, or γ's progress) logs different losses after the resume point. The
stops come from a callback at a chosen optimizer step (`_stop_at_step.py`), never from a timer, so a stop cannot
race the end of the run and no assertion depends on wall-clock time.

One uninterrupted reference (in this process, one thread like the subprocesses) serves every test:
- SIGKILL at the end of step 5 (after checkpoint-4, before checkpoint-6): resume from checkpoint-4 → steps 5–6;
- Ctrl-C (SIGINT) at the end of step 3: `SaveOnInterrupt` saves checkpoint-3 and stops; resume → steps 4–6;
- the γ that DWA-KD logs at each step is the linear schedule at progress (step − 1) / max_steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _kd_helpers import one_thread
from _stop_at_step import trainer_signalling_at
from safetensors.torch import load_file
from test_robustness import env

from dwakd.cli import main

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MAX_STEPS = 6
GAMMA, GAMMA_END = 2.0, 0.8  # DWAKDOptions defaults, restated: the schedule is checked against these numbers
# GPT-2's usual dropout on every path: each step draws fresh masks from the global torch RNG
STUDENT = ("{arch: gpt2, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_positions: 128, "
           "resid_pdrop: 0.1, embd_pdrop: 0.1, attn_pdrop: 0.1}")
TEACHER = ("{arch: qwen2, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64, "
           "max_positions: 128}")


def common(tiny_yaml: Path) -> list[str]:
    return [str(tiny_yaml), f"student.tiny={STUDENT}", f"teacher.tiny={TEACHER}", "method=dwakd",
            "data.max_length=48", "data.max_prompt_length=24", "data.eval=null", "data.max_train_examples=32",
            "training.per_device_train_batch_size=2", f"training.max_steps={MAX_STEPS}",
            "training.logging_steps=1", "training.save_strategy=steps", "training.save_steps=2",
            "method.projector_lr=1e-2",  # projectors move visibly each step, so a lost projector state shows
            "--no-progress"]


def logged(output_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the training log entry of that step (loss, grad norm, every part and stat)."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


def assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    """Every logged number of the given steps equal (parts are logged rounded to 6 decimals: ±1e-6 slack)."""
    for step in steps:
        assert set(got[step]) == set(want[step]), f"step {step}: logged keys differ"
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-6), f"step {step}: {key}"


def assert_same_weights(folder: Path, reference: Path) -> None:
    """Student weights and projectors saved at the end equal the reference's (values, not just shapes)."""
    for name in ("model.safetensors", "distill_method.safetensors"):
        got, want = load_file(str(folder / name)), load_file(str(reference / name))
        assert set(got) == set(want), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")


def train_here(args: list[str], monkeypatch=None, stop_at: tuple[int, int] | None = None) -> int:
    """`dwakd train` in this process on one thread (the subprocesses run with OMP_NUM_THREADS=1)."""
    if stop_at is not None:
        import dwakd.run

        monkeypatch.setattr(dwakd.run, "DistillationTrainer", trainer_signalling_at(*stop_at))
    with one_thread():
        return main(["train", *args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    import yaml

    root = tmp_path_factory.mktemp("reference")
    tree = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    tree["data"]["train"] = str(REPO / tree["data"]["train"])
    (root / "tiny.yaml").write_text(yaml.safe_dump(tree))
    out = root / "run"
    assert train_here([*common(root / "tiny.yaml"), f"output_dir={out}"]) == 0
    return out


def test_dropout_is_on_and_steps_are_random(reference):
    """The premise: the student trains with dropout, so the RNG state matters to every step."""
    config = json.loads((reference / "config.json").read_text())
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.1
    assert sorted(logged(reference)) == list(range(1, MAX_STEPS + 1))


def test_trainer_feeds_progress_to_gamma(reference):
    """γ logged by the method at step k is the linear schedule at progress (k − 1) / max_steps (the trainer sets
    progress from the global step before that step's update)."""
    for step, entry in logged(reference).items():
        want = GAMMA + (GAMMA_END - GAMMA) * (step - 1) / MAX_STEPS
        assert entry["dtw_gamma"] == pytest.approx(want, abs=1e-6), f"step {step}"


def test_sigkill_then_resume_matches_uninterrupted(reference, tiny_yaml, tmp_path):
    out = tmp_path / "killed"
    args = [*common(tiny_yaml), f"output_dir={out}"]
    killed = subprocess.run([sys.executable, str(HERE / "_stop_at_step.py"), "5", "KILL", *args], env=env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "trainer_state.json").exists()  # it died mid-run, before any final save

    # A save cut short by a kill: weights half written, no trainer_state.json. It must be skipped, not loaded.
    broken = out / "checkpoint-6"
    broken.mkdir()
    good = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(good[: len(good) // 3])

    assert train_here([*args, "training.resume_from_checkpoint=last"]) == 0
    from dwakd.checkpoints import checkpoint_problem

    assert checkpoint_problem(broken) is None  # the resumed run wrote that step again, completely
    ref = logged(reference)
    got = logged(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert_same_steps(got, ref, range(1, MAX_STEPS + 1))
    assert_same_weights(out, reference)

    # naming a broken checkpoint explicitly is refused with the reason
    (broken / "trainer_state.json").write_text("{cut")
    assert train_here([*args, f"training.resume_from_checkpoint={broken}"]) == 2


def test_ctrl_c_saves_that_step_then_resume_matches_uninterrupted(reference, tiny_yaml, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "interrupted"
    args = [*common(tiny_yaml), f"output_dir={out}"]
    before = signal.getsignal(signal.SIGINT)
    assert train_here(args, monkeypatch, stop_at=(3, signal.SIGINT)) == 130
    assert "interrupted at step 3" in capsys.readouterr().out
    # SaveOnInterrupt saved the step it stopped at (save_steps=2 would not have), and nothing after it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back

    monkeypatch.undo()
    assert train_here([*args, "training.resume_from_checkpoint=last"]) == 0
    assert_same_steps(logged(out), logged(reference), range(1, MAX_STEPS + 1))
    assert_same_weights(out, reference)
