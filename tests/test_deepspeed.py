"""Issue 9: DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo) equal a single-process run; ZeRO checkpoints save and resume.

Each stage trains `dwakd` for 4 steps with a checkpoint every 2, on 2 processes with the same global batch as
a single-process reference run (4 sequences per step), then resumes a copy of checkpoint-2 to step 4.
The projectors learn at 10x the student's rate, so a projector group lost in DeepSpeed's optimizer shows.
Slow: 5 launches, ~55 s on 2 idle cores (~90 s when busy); the first DeepSpeed run on a machine also compiles
its shared-memory op (~70 s, needs g++). Run with `pytest -m slow tests/test_deepspeed.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from test_robustness import SMALL, cli, env, free_port

# find_spec, not importorskip: collecting the default suite does not import deepspeed
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_spec("deepspeed") is None,
        reason="needs deepspeed: pip install -e '.[distributed]'",
    ),
]

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    *SMALL,
    "method=dwakd",
    "data.max_train_examples=24",
    "training.max_steps=4",
    "training.save_strategy=steps",
    "training.save_steps=2",
    "method.projector_lr=1e-2",
]
# global batch 4 = 2 processes x micro-batch 1 x 2 accumulation steps (ZeRO-2) or x micro-batch 2 (ZeRO-3)
STAGES = {
    "zero2": [
        "training.per_device_train_batch_size=1",
        "training.gradient_accumulation_steps=2",
    ],
    "zero3": ["training.per_device_train_batch_size=2"],
}
# what every logged step must reproduce: the loss, gradient norm, loss parts (summed over ranks), stats
LOGGED = (
    "loss",
    "grad_norm",
    "ce",
    "t2s_ce",
    "t2s_kd",
    "s2t_kd",
    "kd",
    "dtw_hidden",
    "dtw_embedding",
    "student_weight_mean",
    "teacher_weight_mean",
    "gate_mean",
    "t2s_acc",
    "dtw_gamma",
)


def logged(output_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the training log entry of that step."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


def assert_same_logs(
    got: dict[int, dict], expected: dict[int, dict], steps: list[int], rel: float
) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, 5))
    for step in steps:
        for key in (
            LOGGED
        ):  # parts are rounded to 6 decimals when logged, hence the absolute slack
            assert got[step][key] == pytest.approx(
                expected[step][key], rel=rel, abs=2e-6
            ), f"step {step}: {key}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """configs/tiny-cpu.yaml with absolute data paths."""
    tree = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    tree["data"]["train"] = str(REPO / tree["data"]["train"])
    tree["training"]["disable_tqdm"] = True
    path = tmp_path_factory.mktemp("ds") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory) -> Path:
    """The reference: one process, 4 sequences per step."""
    out = tmp_path_factory.mktemp("single")
    subprocess.run(
        cli(
            str(tiny),
            *COMMON,
            f"output_dir={out}",
            "training.per_device_train_batch_size=4",
        ),
        env=env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def launch(config: Path, out: Path, stage: str, *extra: str) -> None:
    """`dwakd train` on 2 CPU processes (torchrun, gloo) with configs/distributed/<stage>.json."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "--master_addr=127.0.0.1",
            "-m",
            "dwakd.cli",
            "train",
            str(config),
            *COMMON,
            f"output_dir={out}",
            "training.ddp_backend=gloo",
            f"training.deepspeed={REPO / 'configs' / 'distributed' / f'{stage}.json'}",
            *STAGES[stage],
            *extra,
        ],
        env={**env(), "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]


def check_checkpoint(ckpt: Path, reference: Path) -> None:
    """Full student (tied embedding once) and projectors, equal to the engine's own ZeRO shards."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    student, method = (
        load_file(str(ckpt / "model.safetensors")),
        load_file(str(ckpt / "distill_method.safetensors")),
    )
    ref_student = load_file(str(reference / "model.safetensors"))
    ref_method = load_file(str(reference / "distill_method.safetensors"))
    assert {k: v.shape for k, v in student.items()} == {
        k: v.shape for k, v in ref_student.items()
    }
    assert {k: v.shape for k, v in method.items()} == {
        k: v.shape for k, v in ref_method.items()
    }
    assert all(v.numel() > 0 for v in [*student.values(), *method.values()])
    # the engine's fp32 shards, consolidated independently of our _save: same values, bit for bit
    engine = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    saved = {
        **{f"student.{k}": v for k, v in student.items()},
        **{f"method.{k}": v for k, v in method.items()},
    }
    assert all(
        k.startswith(("student.", "method.")) for k in engine
    )  # the teacher is not in the engine
    assert set(engine) - set(saved) == {
        "student.lm_head.weight"
    }  # tied to the input embedding, saved once
    for name, value in saved.items():
        assert torch.equal(value, engine[name]), name
    # and the student is the single-process run's (Adam turns float noise in ~0 gradients into +-lr for a few)
    close = sum(
        int(torch.isclose(student[k], ref_student[k], rtol=0, atol=1e-5).sum())
        for k in student
    )
    assert close / sum(v.numel() for v in student.values()) > 0.999


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_on_two_cpu_processes(tiny, single, tmp_path, stage):
    """2 processes == 1 process (loss, grad norm, parts, stats); checkpoint complete; resume == uninterrupted."""
    out = tmp_path / stage
    launch(tiny, out, stage)
    zero = logged(out)
    assert_same_logs(zero, logged(single), steps=[1, 2, 3, 4], rel=1e-4)
    check_checkpoint(out / "checkpoint-2", single / "checkpoint-2")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    state_file = resumed / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][-1]["resumed_from"] = (
        2  # kept only if training really starts from this state
    )
    state_file.write_text(json.dumps(state))
    launch(tiny, resumed, stage, "training.resume_from_checkpoint=last")
    assert logged(resumed)[2].get("resumed_from") == 2, (
        "the run started fresh instead of resuming"
    )
    assert_same_logs(logged(resumed), zero, steps=[3, 4], rel=1e-6)
    check_checkpoint(resumed / "checkpoint-4", out / "checkpoint-4")
