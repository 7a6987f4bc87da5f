"""The trainer feeds the method its schedule inputs: progress = global_step / max_steps and step = global_step,
read before each optimizer step's update, the same for every micro-batch of that step, and carried over a resume.

A recording method (the toy projector method plus a log of what each call received) makes this visible; the DWA-KD
γ that follows from it is checked end to end in tests/test_resume_exact.py.
"""

from __future__ import annotations

from typing import ClassVar

from _kd_helpers import one_thread
from _toy_method import ToyProjectorKD

from dwakd.config import load_config
from dwakd.methods import register_method
from dwakd.run import build_training

MAX_STEPS = 4
NO_DROPOUT = ("{arch: gpt2, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_positions: 128, "
              "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}")
TEACHER = ("{arch: qwen2, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64, "
           "max_positions: 128}")


@register_method
class ScheduleRecorder(ToyProjectorKD):
    """The toy method, remembering (progress, step) of every training call."""

    name = "schedule-recorder-test"
    seen: ClassVar[list[tuple[float, int]]] = []

    def compute_loss(self, inputs):
        if self.training:
            ScheduleRecorder.seen.append((inputs.progress, inputs.step))
        return super().compute_loss(inputs)


def config(tiny_yaml, out, *overrides):
    return load_config(tiny_yaml, [
        "method=schedule-recorder-test", f"student.tiny={NO_DROPOUT}", f"teacher.tiny={TEACHER}",
        "data.max_length=48", "data.max_prompt_length=24", "data.max_train_examples=24", "data.eval=null",
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
        f"training.max_steps={MAX_STEPS}", f"output_dir={out}", *overrides])


def expected(steps: range) -> list[tuple[float, int]]:
    """Two micro-batches per optimizer step, both before that step's update: (k / max_steps, k) for k done."""
    return [(k / MAX_STEPS, k) for k in steps for _ in range(2)]


def test_progress_and_step_reach_the_method(tiny_yaml, tmp_path):
    ScheduleRecorder.seen.clear()
    with one_thread():
        build_training(config(tiny_yaml, tmp_path / "full")).trainer.train()
    assert ScheduleRecorder.seen == expected(range(MAX_STEPS))


def test_progress_and_step_continue_after_resume(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    saving = ("training.save_strategy=steps", "training.save_steps=2")
    with one_thread():
        build_training(config(tiny_yaml, out, *saving)).trainer.train()
        ScheduleRecorder.seen.clear()
        build_training(config(tiny_yaml, out, *saving)).trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert ScheduleRecorder.seen == expected(range(2, MAX_STEPS))
