"""CLI: overrides, unknown keys with the closest valid key, `dwakd methods`, and the tiny training run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dwakd.cli import main
from dwakd.config import ConfigError, apply_overrides, load_config


def test_overrides_parse_yaml_values_and_aliases():
    tree = apply_overrides({"training": {"max_steps": 20}}, [
        "method=dwakd", "output_dir=/tmp/x", "training.max_steps=50", "method.options.gamma=0.1",
        "data.train=[a.jsonl, b.jsonl]", "teacher=null", "training.bf16=true"])
    assert tree["method"] == {"name": "dwakd", "options": {"gamma": 0.1}}
    assert tree["training"] == {"max_steps": 50, "output_dir": "/tmp/x", "bf16": True}
    assert tree["data"]["train"] == ["a.jsonl", "b.jsonl"] and tree["teacher"] is None
    # scientific notation without a dot is a float, not YAML 1.1's string
    assert apply_overrides({}, ["training.learning_rate=2e-3", "x=1E5", "y=-3.5e+2", "z=e5"]) == {
        "training": {"learning_rate": 0.002}, "x": 100000.0, "y": -350.0, "z": "e5"}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["training.max_steps"])


@pytest.mark.parametrize("override, suggestion", [
    ("data.max_lenght=10", "data.max_length"),
    ("studnet.tokenizer=x", "student"),
    ("training.learning_rat=1", "training.learning_rate"),
    ("method.projector_l=1", "method.projector_lr"),
    ("student.lora.rank=4", "student.lora.r"),
])
def test_unknown_keys_name_the_closest(tiny_yaml, override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_yaml, [override])
    assert f"Did you mean '{suggestion}" in str(info.value) and str(tiny_yaml) in str(info.value)


def test_bad_values_are_config_errors(tiny_yaml):
    with pytest.raises(ConfigError, match="max_prompt_length < data.max_length"):
        load_config(tiny_yaml, ["data.max_length=16", "data.max_prompt_length=32"])
    with pytest.raises(ConfigError, match="on_nonfinite"):
        load_config(tiny_yaml, ["method.on_nonfinite=ignore"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tiny_yaml, ["student=3"])


def test_unknown_method_and_option_exit_2(tiny_yaml, capsys):
    assert main(["train", str(tiny_yaml), "method=dskd2"]) == 2
    assert "unknown method 'dskd2'" in capsys.readouterr().err
    assert main(["train", str(tiny_yaml), "method.options.nonsense=1"]) == 2
    assert "has no option 'nonsense'" in capsys.readouterr().err


def test_methods_lists_registered_names(capsys):
    from dwakd.methods import method_names

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == method_names() and "sft" in printed


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "dwakd.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "methods" in out.stdout


def test_tiny_train_writes_safetensors(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "cli-run"
    assert main(["train", str(tiny_yaml), f"output_dir={out}", "training.max_steps=2", "--no-progress"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "dwakd_config.yaml").is_file()
    assert not list(out.glob("*.bin")) or [p.name for p in out.glob("*.bin")] == ["training_args.bin"]
