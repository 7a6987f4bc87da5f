"""Distillation methods: one module each, all on the `DistillationMethod` interface.

Importing this package registers every built-in method. A method module that fails to import
because an optional dependency is missing is skipped, so the others stay available.
"""

import importlib
import logging

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

__all__ = [
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
    "method_names",
    "method_title",
    "register_method",
    "register_preset",
]
