"""Run configuration: dataclasses loaded from YAML, with `dotted.key=value` overrides from the command line.

Unknown keys are errors that name the closest valid key. `training` takes any
`transformers.TrainingArguments` field on top of `TRAINING_DEFAULTS`; `method.options` takes the chosen method's
options. Everything that can be checked without a tokenizer, data or a model is checked when the config is read:
the method's options are built (type-checked here, value-checked by the options dataclass) and a bad value is a
`ConfigError` naming `method.options.NAME`. `training_arguments` builds the `TrainingArguments` and turns their
validation errors into `ConfigError`s naming the `training.*` key and the fix; `dwakd train` calls it first.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dwakd.models import LoraSpec, ModelSpec

if TYPE_CHECKING:
    from transformers import TrainingArguments


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
    """Where the instruction data comes from and how it is cut (docs/methods.md)."""

    train: list[str] | str | None = None  # JSONL path(s), a dir with train.jsonl, or a `datasets` name
    eval: list[str] | str | None = None  # optional held-out set; else `eval_size` records are split off train
    eval_size: int | float = 0
    split_seed: int = 42
    max_train_examples: int | None = None
    max_prompt_length: int = 256
    max_length: int = 512
    skip_invalid: bool = False  # skip malformed rows (reporting file:line) instead of stopping
    # batch examples of similar length together (less compute on padding; off by default: batches of one length can
    # be batches of few tasks, which slowed learning on the demo's suite: docs/methods.md section 1.3)
    group_by_length: bool = False


@dataclass
class MethodConfig:
    """Which distillation method and its options; projectors get their own learning rate."""

    name: str = "sft"
    options: dict[str, Any] = field(default_factory=dict)
    projector_lr: float = 1e-3
    on_nonfinite: str = "stop"  # "stop" (raise, naming the part and step) or "skip" (drop that micro-batch)


@dataclass
class OnPolicyConfig:
    """On-policy distillation (docs/methods.md#10-on-policy-distillation): with probability `fraction` per
    micro-batch the student samples a response to each prompt, and the method trains on that text, dual-tokenized
    like the data, with the teacher scoring its own tokenization of it. `fraction: 0` is the off-policy run.

    Sampling settings are the student's generation settings for these samples (not the evaluation protocol's:
    `no_repeat_ngram_size` is off unless set). `max_new_tokens: null` allows `data.max_length -
    data.max_prompt_length` tokens, so prompt + sample never exceed `data.max_length`.
    """

    fraction: float = 0.0  # GKD's λ: probability that a micro-batch is replaced by the student's samples
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    save_samples: bool = False  # write every sample and its scores to OUTPUT_DIR/on_policy_samples.jsonl

    def __post_init__(self) -> None:
        def number(key: str, value: Any, integer: bool = False) -> None:
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                raise ConfigError(f"on_policy.{key}: expected {'an integer' if integer else 'a number'}, "
                                  f"got {value!r}")

        number("fraction", self.fraction)
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"on_policy.fraction: must be in [0, 1] (the share of on-policy micro-batches); "
                              f"got {self.fraction!r}")
        if self.max_new_tokens is not None:
            number("max_new_tokens", self.max_new_tokens, integer=True)
            if self.max_new_tokens < 1:
                raise ConfigError(f"on_policy.max_new_tokens: must be at least 1; got {self.max_new_tokens!r}")
        number("temperature", self.temperature)
        if self.temperature <= 0:
            raise ConfigError(f"on_policy.temperature: must be > 0 (this is sampling); got {self.temperature!r}")
        number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"on_policy.top_p: must be in (0, 1]; got {self.top_p!r}")
        number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise ConfigError(f"on_policy.top_k: must be ≥ 0 (0 = off); got {self.top_k!r}")
        number("no_repeat_ngram_size", self.no_repeat_ngram_size, integer=True)
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"on_policy.no_repeat_ngram_size: must be ≥ 0 (0 = off); "
                              f"got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.save_samples, bool):
            raise ConfigError(f"on_policy.save_samples: expected true or false, got {self.save_samples!r}")

    @property
    def enabled(self) -> bool:
        """Whether any micro-batch can be on-policy."""
        return self.fraction > 0


# Training defaults (the paper recipes' optimizer settings; docs/methods.md). A config's `training:` block is
# laid over them key by key, so `RunConfig.training` always holds every value the run uses.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/dwakd",
    "learning_rate": 5e-4,
    "weight_decay": 0.01,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 8,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    # the distillation collator's batches: keep every column, the loss comes from the model, labels by name
    "remove_unused_columns": False,
    "label_names": ["labels"],
    "dataloader_num_workers": 0,
    "prediction_loss_only": True,
}


@dataclass
class RunConfig:
    """A whole `dwakd train` run."""

    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec | None = None
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: dict[str, Any] = field(default_factory=dict)  # transformers.TrainingArguments kwargs
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    seed: int = 42

    def __post_init__(self) -> None:
        self.training = {**TRAINING_DEFAULTS, **(self.training or {})}
        if self.on_policy is None:  # `on_policy: null` in a config
            self.on_policy = OnPolicyConfig()

    def training_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the run's `TrainingArguments` (seed from `seed` unless `training.seed` is set)."""
        kwargs = {"seed": self.seed, **self.training}
        kwargs.pop("resume_from_checkpoint", None)  # a `dwakd train` option (see run.resolve_resume), not an argument
        if kwargs.get("fsdp") and not _has_accelerator():
            # FSDP's `sync_module_states` (default true in transformers < 5) broadcasts from a GPU and makes
            # accelerate refuse a CPU-only run; on CPU every rank builds the same weights from the same seed anyway.
            fsdp_config = dict(kwargs.get("fsdp_config") or {})
            fsdp_config.setdefault("sync_module_states", False)
            kwargs["fsdp_config"] = fsdp_config
        return kwargs


def _has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA, XPU, MPS...)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


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


def _type_problem(value: Any, annotation: Any) -> str | None:
    """Why `value` does not fit a simple annotation (bool, int, float, str, Sequence[...], X | None), else None."""
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, arg) for arg in typing.get_args(annotation)]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if annotation is type(None):
        return None if value is None else "null"
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"one of {list(choices)}"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        if isinstance(value, str) and item is str and origin is collections.abc.Sequence:
            return None  # one name for a sequence of names (methods accept `dtw_layers: hidden`)
        if not isinstance(value, (list, tuple)):
            return "a list"
        for element in value:
            problem = _type_problem(element, item)
            if problem:
                return f"a list whose items are each {problem}"
        return None
    return None


def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation resolved; one that cannot be resolved (e.g. a string annotation of a field added by
    `dataclasses.make_dataclass` in another module) is Any, i.e. not type-checked here."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        pass
    namespace: dict[str, Any] = {**vars(typing), **vars(collections.abc)}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        if module is not None:
            namespace.update(vars(module))
    resolved = {}
    for f in dataclasses.fields(cls):
        annotation = f.type
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(namespace))  # noqa: S307 (an annotation of our own dataclasses)
            except Exception:  # noqa: BLE001
                annotation = Any
        resolved[f.name] = annotation
    return resolved


def check_method_options(method: MethodConfig) -> None:
    """Build the method's options now (types checked here, values by its dataclass): bad ones name their key.

    Raises ConfigError naming `method.name` for an unknown method and `method.options.NAME` for an unknown
    option, a value of the wrong type, or one the options dataclass rejects (`OptionError`).
    """
    from dwakd.methods import build_options, get_method
    from dwakd.methods.base import OptionError
    from dwakd.methods.registry import UnknownMethodError

    try:
        cls, _ = get_method(method.name)
    except UnknownMethodError as exc:
        raise ConfigError(f"method.name: {exc}") from exc
    if not isinstance(method.options, dict):
        raise ConfigError(f"method.options must be a mapping of option names to values, got {method.options!r}")
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = _field_types(cls.Options)
    for key, value in method.options.items():
        if key not in fields:
            try:
                build_options(method.name, {key: value})
            except UnknownMethodError as exc:
                raise ConfigError(f"method.options.{key}: {exc}") from exc
            raise ConfigError(f"method.options.{key}: method {method.name!r} has no option {key!r}")
        problem = _type_problem(value, hints[key])
        if problem:
            raise ConfigError(f"method.options.{key}: expected {problem}, got {value!r}")
    try:
        build_options(method.name, method.options)
    except OptionError as exc:
        raise ConfigError(str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method.options: {method.name!r} rejects these options: {exc}") from exc


def validate(config: RunConfig, source: str = "config") -> RunConfig:
    """Check values that dataclasses cannot: known training args, sane lengths, the method's options."""
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
    try:
        check_method_options(config.method)
        check_on_policy(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return config


def check_on_policy(config: RunConfig) -> None:
    """What `on_policy` needs from the rest of the config: a live teacher and a response budget that fits."""
    policy, d = config.on_policy, config.data
    if not policy.enabled:
        return
    from dwakd.methods import get_method

    if not get_method(config.method.name)[0].needs_teacher:
        raise ConfigError(f"on_policy.fraction: {policy.fraction} needs a method with a teacher to score the "
                          f"student's samples; {config.method.name!r} has none (set on_policy.fraction=0)")
    if config.teacher is not None and getattr(config.teacher, "cache", None):
        # `teacher.cache` (a teacher-cache directory) holds outputs for the dataset's text only
        raise ConfigError("on_policy.fraction: a cached teacher (teacher.cache) cannot score the student's new "
                          "samples; set on_policy.fraction=0 or drop teacher.cache to run the teacher live")
    budget = d.max_length - d.max_prompt_length
    if policy.max_new_tokens is not None and policy.max_new_tokens > budget:
        raise ConfigError(f"on_policy.max_new_tokens: {policy.max_new_tokens} is more than data.max_length - "
                          f"data.max_prompt_length = {budget} tokens that can follow a prompt; lower it (or leave "
                          "it unset for that budget)")


def _training_error(exc: Exception, kwargs: dict[str, Any]) -> str:
    """A TrainingArguments validation error as a message naming the `training.*` key(s) and the fix."""
    message = " ".join(str(exc).split())
    if "bf16" in message and kwargs.get("bf16"):
        return ("training.bf16: bf16 needs a GPU with bf16 support; this machine has none. Set training.bf16=false "
                "(or training.use_cpu=true to run bf16 autocast on the CPU, which is slow). "
                f"transformers said: {message}")
    if isinstance(exc, ImportError) and kwargs.get("deepspeed"):
        return ("training.deepspeed: DeepSpeed is not installed; install it with "
                f"`DS_BUILD_OPS=0 pip install -e \".[distributed]\"` or remove training.deepspeed. ({message})")
    named = []
    for key, value in kwargs.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message) or (
                isinstance(value, str) and value and message.startswith(f"{value} is not a valid")):
            named.append(f"training.{key}")
    where = ", ".join(named) if named else "training"
    return f"{where}: {message}"


# What `accelerate launch --mixed_precision` (or nothing) put in the environment when this process started.
# transformers 4.x writes `training.bf16`/`fp16` into ACCELERATE_MIXED_PRECISION when it builds TrainingArguments and
# never takes it back, and its Trainer reads the variable: after one bf16 run, every later run in the same process
# (a notebook, a test session, several configs in one script) would train under bf16 autocast too.
_LAUNCH_MIXED_PRECISION = os.environ.get("ACCELERATE_MIXED_PRECISION")


def _restore_launch_mixed_precision() -> None:
    """Put ACCELERATE_MIXED_PRECISION back to its value at process start (unset if it had none)."""
    if _LAUNCH_MIXED_PRECISION is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = _LAUNCH_MIXED_PRECISION


def training_arguments(config: RunConfig) -> TrainingArguments:
    """The run's `transformers.TrainingArguments`; a value they reject is a ConfigError naming its key and the fix.

    Each call starts from the launch-time mixed precision, so no earlier run's `training.bf16` carries over.
    """
    from transformers import TrainingArguments

    kwargs = config.training_kwargs()
    _restore_launch_mixed_precision()
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(_training_error(exc, kwargs)) from exc


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


__all__ = ["TRAINING_DEFAULTS", "ConfigError", "DataConfig", "LoraSpec", "MethodConfig", "ModelSpec", "OnPolicyConfig",
           "RunConfig", "apply_overrides", "check_method_options", "check_on_policy", "config_from_dict",
           "config_to_dict", "load_config", "training_arguments"]
