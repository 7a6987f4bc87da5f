"""Run configuration: dataclasses loaded from YAML, with `dotted.key=value` overrides from the command line.

Unknown keys are errors that name the closest valid key. `training` takes any
`transformers.TrainingArguments` field; `method.options` takes the chosen method's options.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dwakd.models import LoraSpec, ModelSpec


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `5e-4` (no dot) as a string; configs mean a float, so resolve it as one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """yaml.safe_load with scientific notation as floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A configuration problem; the message names the file/key to fix."""


@dataclass
class DataConfig:
    """Where the instruction data comes from and how it is cut (SPEC §1)."""

    train: list[str] | str | None = None  # JSONL path(s), a dir with train.jsonl, or a `datasets` name
    eval: list[str] | str | None = None  # optional held-out set; else `eval_size` records are split off train
    eval_size: int | float = 0
    split_seed: int = 42
    max_train_examples: int | None = None
    max_prompt_length: int = 256
    max_length: int = 512
    skip_invalid: bool = False  # skip malformed rows (reporting file:line) instead of stopping


@dataclass
class MethodConfig:
    """Which distillation method and its options; projectors get their own learning rate."""

    name: str = "sft"
    options: dict[str, Any] = field(default_factory=dict)
    projector_lr: float = 1e-3
    on_nonfinite: str = "stop"  # "stop" (raise, naming the part and step) or "skip" (drop that micro-batch)


@dataclass
class RunConfig:
    """A whole `dwakd train` run."""

    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec | None = None
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: dict[str, Any] = field(default_factory=dict)  # transformers.TrainingArguments kwargs
    seed: int = 42


# Short aliases accepted on the command line.
ALIASES = {"method": "method.name", "output_dir": "training.output_dir", "max_steps": "training.max_steps"}


def _training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _dataclass_for(annotation) -> type | None:
    """The dataclass inside an annotation such as `ModelSpec | None`."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _build(cls: type, values: Any, path: str) -> Any:
    """Recursively build dataclass `cls` from a dict, rejecting unknown keys with a suggestion."""
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ConfigError(f"'{path or 'config'}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            full = f"{path}.{key}" if path else key
            candidates = [f"{path}.{n}" if path else n for n in names]
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys here: {', '.join(candidates)}"
            raise ConfigError(f"unknown config key '{full}'.{hint}")
        sub = _dataclass_for(hints[key])
        kwargs[key] = _build(sub, value, f"{path}.{key}" if path else key) if sub and value is not None else value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is not a mapping")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, booleans, lists, null)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. training.max_steps=50)")
        key, raw = item.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        _set_dotted(tree, key, parse_yaml(raw) if raw != "" else "")
    return tree


def validate(config: RunConfig, source: str = "config") -> RunConfig:
    """Check values that dataclasses cannot: known training args, sane lengths, a teacher when needed."""
    valid = _training_fields()
    for key in config.training:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f" Did you mean 'training.{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key 'training.{key}' (not a TrainingArguments field).{hint}")
    d = config.data
    if d.max_prompt_length <= 0 or d.max_length <= d.max_prompt_length:
        raise ConfigError(f"{source}: need 0 < data.max_prompt_length < data.max_length, "
                          f"got {d.max_prompt_length} and {d.max_length}")
    if config.method.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"{source}: method.on_nonfinite must be 'stop' or 'skip', got {config.method.on_nonfinite!r}")
    if config.method.projector_lr <= 0:
        raise ConfigError(f"{source}: method.projector_lr must be positive")
    if not d.train:
        raise ConfigError(f"{source}: data.train is not set")
    if config.student.cache is not None:
        raise ConfigError(f"{source}: student.cache: only the teacher can come from a cache (teacher.cache)")
    return config


def config_from_dict(tree: dict, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a plain dict."""
    try:
        config = _build(RunConfig, tree, "")
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return validate(config, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config and apply overrides; relative paths in it are relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config_from_dict(apply_overrides(tree, overrides or []), str(path))


def config_to_dict(config: RunConfig) -> dict:
    """Plain dict (for saving next to the run's outputs)."""
    return dataclasses.asdict(config)


__all__ = ["ConfigError", "DataConfig", "LoraSpec", "MethodConfig", "ModelSpec", "RunConfig", "apply_overrides",
           "config_from_dict", "config_to_dict", "load_config"]
