"""Method registry: name -> (method class, option overrides). Presets reuse a class with other defaults.

The built-in methods register themselves when `dwakd.methods` is imported, which Python always does before this
module (it is inside that package), so every lookup here already sees them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from dwakd.methods.base import DistillationMethod, MethodContext, MethodOptions


class UnknownMethodError(KeyError):
    """An unknown method name or option; the message suggests the closest valid one."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, tuple[type[DistillationMethod], dict[str, Any]]] = {}
_TITLES: dict[str, str] = {}  # presets' table labels (a class's own is `cls.title`)


def register_method(cls: type[DistillationMethod]) -> type[DistillationMethod]:
    """Class decorator: register a method under `cls.name`."""
    register_preset(cls.name, cls)
    return cls


def register_preset(name: str, cls: type[DistillationMethod], *, title: str = "", **defaults: Any) -> None:
    """Register `name` as `cls` with some options set by default (e.g. an ablation); `title` labels it in tables."""
    if name in _REGISTRY and _REGISTRY[name][0] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name][0].__name__}")
    unknown = set(defaults) - set(cls.option_names())
    if unknown:
        raise ValueError(f"preset {name!r}: unknown options {sorted(unknown)}")
    _REGISTRY[name] = (cls, defaults)
    if title:
        _TITLES[name] = title


def method_names() -> list[str]:
    """All registered method names, sorted."""
    return sorted(_REGISTRY)


def method_title(name: str) -> str:
    """How tables and plots label a method: the preset's title, else its class's `title`, else the name itself
    (also for names that are not registered)."""
    if name in _TITLES:
        return _TITLES[name]
    if name in _REGISTRY and _REGISTRY[name][0].name == name:
        return _REGISTRY[name][0].title or name
    return name


def get_method(name: str) -> tuple[type[DistillationMethod], dict[str, Any]]:
    """Class and preset defaults for `name`; unknown names get the closest match in the error."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_options(name: str, overrides: dict[str, Any] | None = None) -> MethodOptions:
    """The method's options dataclass: its defaults, then the preset's, then the user's overrides."""
    cls, preset = get_method(name)
    values = {**preset, **(overrides or {})}
    valid = {f.name: f for f in dataclasses.fields(cls.Options)}
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" Did you mean 'method.options.{close[0]}'?" if close else ""
            raise UnknownMethodError(f"method {name!r} has no option {key!r}.{hint} Options: {', '.join(valid)}")
    return cls.Options(**values)


def build_method(name: str, context: MethodContext, overrides: dict[str, Any] | None = None) -> DistillationMethod:
    """Instantiate a registered method with its options."""
    cls, _ = get_method(name)
    return cls(build_options(name, overrides), context)
