"""Which checkpoints are safe to resume from.

The Trainer writes a checkpoint in a fixed order — weights, method state, optimizer/scheduler, RNG — and
`trainer_state.json` last. A process killed mid-way (SIGKILL, OOM, preemption) therefore leaves a folder
without a readable `trainer_state.json`, or with weights whose safetensors header is cut. Such a folder is
skipped when resuming with `last`, and refused when named explicitly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from safetensors import safe_open

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: str | Path, need_optimizer: bool = True) -> str | None:
    """None if `folder` is a complete dwakd/Trainer checkpoint, else what is wrong with it."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was interrupted)"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is cut or corrupt"
    weights = sorted(folder.glob("*.safetensors"))
    if not any(w.name in ("model.safetensors", "adapter_model.safetensors") or w.name.startswith("model-")
               for w in weights):
        return "no student weights (model.safetensors / adapter_model.safetensors)"
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for cut files
            return f"{path.name} is unreadable ({exc})"
    if need_optimizer and not (folder / "optimizer.pt").is_file():
        return "no optimizer.pt"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders in `output_dir`, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | Path, need_optimizer: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are reported and skipped (never deleted)."""
    for folder in list_checkpoints(output_dir):
        problem = checkpoint_problem(folder, need_optimizer)
        if problem is None:
            return folder
        logger.warning("skipping incomplete checkpoint %s: %s", folder, problem)
    return None
