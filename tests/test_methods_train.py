"""Every registered method trains through `dwakd train` on configs/tiny-cpu.yaml (real Qwen and GPT-2 vocabularies).

Default run: a few steps each, the loss finite and every trainable part of the method receiving gradients.
`-m slow`: 50 steps each and the training loss goes down (mean of the last 10 logged steps below the first 10).
"""

from __future__ import annotations

import math

import pytest
from _spacy_helpers import method_extra

from dwakd.config import load_config
from dwakd.methods import method_names
from dwakd.run import build_training

METHODS = [name for name in method_names() if not name.endswith("-test")]
FAST = ["data.max_length=64", "data.max_prompt_length=32", "data.eval=null", "training.logging_steps=1",
        "training.per_device_train_batch_size=4"]


def run_steps(tiny_yaml, tmp_path, method: str, steps: int, extra: list[str] = ()):
    config = load_config(tiny_yaml, [f"method={method}", f"output_dir={tmp_path / method}",
                                     f"training.max_steps={steps}", *FAST, *extra])
    run = build_training(config, show_progress=False)
    run.trainer.train()
    logged = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    return run, logged


def test_all_issue_methods_registered():
    for name in ["sft", "dskd", "dwakd", "dwakd-ew", "dwakd-dtw", "dwakd-bdtw", "dwakd-nogate", "alm", "cdm",
                 "dskd-cma-ga", "sra", "mta"]:
        assert name in METHODS


def test_methods_command_lists_the_alignment_baselines(capsys):
    from dwakd.cli import main

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out.split()
    assert "alm" in printed and "cdm" in printed


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_finite(tiny_yaml, tmp_path, method, request):
    run, logged = run_steps(tiny_yaml, tmp_path, method, 2, method_extra(method, request))
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged)
    if run.model.teacher is not None:
        assert all(p.grad is None for p in run.model.teacher.parameters())
    # the optimizer moved every trainable projector (each received a gradient at some step)
    state = run.trainer.optimizer.state
    for name, param in run.model.method.named_parameters():
        if param.requires_grad:
            assert param in state and state[param]["exp_avg"].abs().sum() > 0, f"{method}: {name} got no gradient"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_50_steps_reduce_loss(tiny_yaml, tmp_path, method, request):
    _, logged = run_steps(tiny_yaml, tmp_path, method, 50,
                          ["training.learning_rate=2e-3", *method_extra(method, request)])
    assert len(logged) == 50 and all(math.isfinite(x) for x in logged)
    first, last = sum(logged[:10]) / 10, sum(logged[-10:]) / 10
    assert last < first, f"{method}: loss {first:.4f} -> {last:.4f}"
