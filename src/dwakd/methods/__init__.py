"""Distillation methods: one module each, all on the `DistillationMethod` interface.

Importing this package registers every built-in method, then the methods other installed packages declare under
the `dwakd.methods` entry-point group (docs/methods.md, "Writing a method"). A method module that fails to import
because an optional dependency is missing is skipped, so the others stay available.
"""

import importlib
import logging
from importlib.metadata import EntryPoint, entry_points

from dwakd.methods.base import (
    DistillationInputs,
    DistillationMethod,
    LossOutput,
    MethodContext,
    MethodOptions,
    ModelView,
    TokenView,
)
from dwakd.methods.registry import (
    build_method,
    build_options,
    get_method,
    method_names,
    method_title,
    register_method,
    register_preset,
)

_BUILTIN = ["sft", "dskd", "dwakd", "uld", "mined", "multilevel_ot", "dskdv2", "dwakdv2", "alm", "cdm", "dskd_cma_ga",
            "sra", "mta"]

for _module in _BUILTIN:
    try:
        importlib.import_module(f"dwakd.methods.{_module}")
    except ModuleNotFoundError as _exc:  # a method not written yet, or an optional dependency missing
        if _exc.name != f"dwakd.methods.{_module}":
            logging.getLogger(__name__).warning("method %s unavailable: %s", _module, _exc)

ENTRY_POINT_GROUP = "dwakd.methods"


def load_plugin_methods(points: list[EntryPoint] | None = None) -> list[str]:
    """Import each module another package declares under the `dwakd.methods` entry-point group; importing it
    registers its methods (`@register_method`, `register_preset`). Returns the entry points loaded. One that fails
    to import or to register is skipped with a warning naming it and its package, so the other methods stay
    available."""
    loaded = []
    for point in entry_points(group=ENTRY_POINT_GROUP) if points is None else points:
        package = f" (package {point.dist.name})" if getattr(point, "dist", None) else ""
        try:
            point.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the built-in methods down
            logging.getLogger(__name__).warning("method plugin %r = %r%s not loaded: %s: %s", point.name,
                                                point.value, package, type(exc).__name__, exc)
            continue
        loaded.append(point.name)
    return loaded


load_plugin_methods()

__all__ = [
    "ENTRY_POINT_GROUP",
    "DistillationInputs",
    "DistillationMethod",
    "LossOutput",
    "MethodContext",
    "MethodOptions",
    "ModelView",
    "TokenView",
    "build_method",
    "build_options",
    "get_method",
    "load_plugin_methods",
    "method_names",
    "method_title",
    "register_method",
    "register_preset",
]
