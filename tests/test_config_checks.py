"""Config-time checks: method options and TrainingArguments fail fast as ConfigErrors naming the key, before
any tokenizer, data or model is loaded; training defaults live with the config."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pytest
import torch

from dwakd.cli import main
from dwakd.config import (
    TRAINING_DEFAULTS,
    ConfigError,
    RunConfig,
    check_method_options,
    load_config,
    training_arguments,
)
from dwakd.methods import DistillationMethod, MethodOptions
from dwakd.methods.base import OptionError


@dataclass
class _CheckedOptions(MethodOptions):
    width: int = 4  # must be positive
    mode: str = "a"

    def __post_init__(self):
        if self.width <= 0:
            raise OptionError("width", f"must be positive, got {self.width}")


class _CheckedMethod(DistillationMethod):
    """Test-only method whose options dataclass validates a value (the OptionError contract)."""

    name = "options-check-test"
    Options = _CheckedOptions
    needs_teacher = False


@pytest.fixture(autouse=True)
def _checked_method_registered(monkeypatch):
    """`options-check-test` is registered for this module's tests only (not for the rest of the session)."""
    from dwakd.methods import registry

    monkeypatch.setitem(registry._REGISTRY, _CheckedMethod.name, (_CheckedMethod, {}))


class _Loaded(Exception):
    """Raised by the patched loaders: something was loaded that a config error should have prevented."""


@pytest.fixture
def no_loading(monkeypatch):
    """Every tokenizer / data / model loader used by `dwakd train` raises `_Loaded` and records its call."""
    import dwakd.models
    import dwakd.run

    calls = []

    def refuse(name):
        def loader(*args, **kwargs):
            calls.append(name)
            raise _Loaded(name)
        return loader

    for module in (dwakd.run, dwakd.models):
        for name in ("load_side_model", "load_side_tokenizer", "build_tiny_model"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse(name))
    monkeypatch.setattr(dwakd.run, "load_datasets", refuse("load_datasets"))
    return calls


@pytest.mark.parametrize("overrides, message", [
    (["method=dwakd", "method.options.gamma=-1"], "method.options.gamma:"),
    (["method=dwakd", "method.options.gamma=abc"], "method.options.gamma: expected a number, got 'abc'"),
    (["method=dwakd", "method.options.token_weights=3"], "method.options.token_weights: expected true or false"),
    (["method=dwakd", "method.options.dtw_layers=[hidden, 3]"], "method.options.dtw_layers: expected a list"),
    (["method=dwakd", "method.options.gama=1"], "method.options.gama: method 'dwakd' has no option 'gama'. "
                                                 "Did you mean 'method.options.gamma'?"),
    (["method=options-check-test", "method.options.width=0"], "method.options.width: must be positive, got 0"),
    (["method=options-check-test", "method.options.width=2.5"], "method.options.width: expected an integer"),
    (["method=dwakdd"], "method.name: unknown method 'dwakdd'. Did you mean 'dwakd'?"),
    (["training.lr_scheduler_type=cosin"], "training.lr_scheduler_type: cosin is not a valid SchedulerType"),
    (["method=dskd", "teacher.tiny=null", "teacher.name_or_path=runs/teacher-sft/none"],
     "teacher.name_or_path: 'runs/teacher-sft/none' is not a folder here and cannot be a hub name"),
])
def test_bad_values_exit_2_naming_the_key_before_anything_loads(tiny_yaml, capsys, no_loading, overrides, message):
    assert main(["train", str(tiny_yaml), *overrides, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and no_loading == []


def test_good_options_reach_the_loaders(tiny_yaml, no_loading):
    """The patched loaders are the ones `dwakd train` calls (else the test above could not fail)."""
    with pytest.raises(_Loaded):
        main(["train", str(tiny_yaml), "method=dwakd", "method.options.gamma=0.5", "--no-progress"])
    assert no_loading == ["load_side_tokenizer"]


def test_bad_options_fail_when_the_config_is_read(tiny_yaml):
    with pytest.raises(ConfigError, match=r"tiny\.yaml: method\.options\.width: must be positive"):
        load_config(tiny_yaml, ["method=options-check-test", "method.options.width=-3"])
    config = load_config(tiny_yaml, ["method=dwakd", "method.options.dtw_layers=hidden", "method.options.kd_rate=1"])
    assert config.method.options == {"dtw_layers": "hidden", "kd_rate": 1}
    with pytest.raises(ConfigError, match="method.options.ce_weight: expected a number or null"):
        check_method_options(load_config(tiny_yaml, ["method=dwakd"]).method.__class__(
            name="dwakd", options={"ce_weight": "half"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is valid on a GPU machine")
def test_bf16_without_gpu_names_the_key_and_the_fix(tiny_yaml, capsys, no_loading):
    assert main(["train", str(tiny_yaml), "training.use_cpu=false", "training.bf16=true", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training.bf16: bf16 needs a GPU" in err and "set training.bf16=false" in err.lower()
    assert no_loading == []


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_before_loading(tiny_yaml, no_loading, caplog, monkeypatch,
                                                                     native):
    import dwakd.run

    monkeypatch.setattr(dwakd.run, "emulated_on_cpu", lambda dtype: not native and dtype == torch.bfloat16)
    caplog.set_level(logging.WARNING, logger="dwakd.run")
    with pytest.raises(_Loaded):
        main(["train", str(tiny_yaml), "training.use_cpu=true", "training.bf16=true", "--no-progress"])
    assert no_loading == ["load_side_tokenizer"]  # warned before anything loads
    warned = [r.getMessage() for r in caplog.records if "instructions" in r.getMessage()]
    if native:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith("training.bf16: true computes in torch.bfloat16")
        assert "set training.bf16=false" in warned[0]


def test_a_model_loaded_in_an_emulated_dtype_is_named_by_its_key(tiny_yaml, tmp_path, caplog, monkeypatch):
    import dwakd.run

    monkeypatch.setattr(dwakd.run, "emulated_on_cpu", lambda dtype: dtype == torch.bfloat16)
    caplog.set_level(logging.WARNING, logger="dwakd.run")
    config = load_config(tiny_yaml, ["method=dskd", "teacher.dtype=bfloat16", "data.eval=null",
                                     f"output_dir={tmp_path / 'run'}"])
    run = dwakd.run.build_training(config, show_progress=False)
    assert next(run.model.teacher.parameters()).dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "instructions" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("teacher.dtype: bfloat16 computes in torch.bfloat16")
    assert "set teacher.dtype=float32" in warned[0]


@pytest.mark.parametrize("launched_with", [None, "fp16"])
def test_an_earlier_runs_bf16_does_not_carry_over(tiny_yaml, monkeypatch, launched_with):
    """transformers 4.x leaves `training.bf16` in ACCELERATE_MIXED_PRECISION, which its Trainer reads: a later run in
    the same process must start from the launch-time value (here a stale "bf16" stands for the earlier run)."""
    import dwakd.config

    monkeypatch.setattr(dwakd.config, "_LAUNCH_MIXED_PRECISION", launched_with)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = training_arguments(load_config(tiny_yaml, []))  # use_cpu, no bf16
    assert not args.bf16
    assert os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == (launched_with or "no")
    assert getattr(args, "mixed_precision", launched_with or "no") == (launched_with or "no")  # transformers 5


def test_training_defaults_live_with_the_config(tiny_yaml):
    assert RunConfig().training == TRAINING_DEFAULTS
    config = load_config(tiny_yaml, ["training.weight_decay=0.1"])
    assert config.training["weight_decay"] == 0.1 and config.training["learning_rate"] == 1e-3  # config wins
    assert config.training["lr_scheduler_type"] == TRAINING_DEFAULTS["lr_scheduler_type"]  # default fills in
    args = training_arguments(load_config(tiny_yaml, ["seed=7", "training.resume_from_checkpoint=last"]))
    assert args.seed == 7 and args.weight_decay == TRAINING_DEFAULTS["weight_decay"]
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    assert training_arguments(load_config(tiny_yaml, ["seed=7", "training.seed=3"])).seed == 3


def test_paper_recipes_name_only_files_their_steps_make():
    """Every configs/paper recipe reads the data `dwakd data dolly --out data/dolly` writes and, for the teacher,
    what a configs/paper/teacher-sft recipe writes; its comments name that recipe."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "paper"
    made = {}
    for path in sorted((root / "teacher-sft").glob("*.yaml")):
        config = load_config(path)
        assert config.method.name == "sft" and config.teacher is None, path.name
        assert (config.data.train, config.data.eval) == ("data/dolly/train.jsonl", "data/dolly/dev.jsonl"), path.name
        assert "dwakd data dolly --out data/dolly" in path.read_text(), path.name
        made[config.training["output_dir"]] = path
    assert len(made) == 4
    for path in sorted(root.glob("*.yaml")):
        config, text = load_config(path), path.read_text()
        assert (config.data.train, config.data.eval) == ("data/dolly/train.jsonl", "data/dolly/dev.jsonl"), path.name
        assert "dwakd data dolly --out data/dolly" in text, path.name
        local = config.teacher.adapter or config.teacher.name_or_path
        assert local in made, (path.name, local)
        assert f"dwakd train configs/paper/teacher-sft/{made[local].name}" in text, path.name
        assert "SPEC" not in text and "shared/" not in text, path.name
