"""Reading dwakd checkpoints: which ones are safe to resume from, and loading the student and method state.

The Trainer writes a checkpoint in a fixed order — weights, method state, optimizer/scheduler, RNG — and
`trainer_state.json` last. A process killed mid-way (SIGKILL, OOM, preemption) therefore leaves a folder
without a readable `trainer_state.json`, or with weights whose safetensors header is cut. Such a folder is
skipped when resuming with `last`, and refused when named explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dwakd.models import is_peft_model

logger = logging.getLogger(__name__)

METHOD_WEIGHTS_NAME = "distill_method.safetensors"  # the method's projectors/state, next to the student
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


def load_student_weights(student: nn.Module, checkpoint: str) -> None:
    """Load a checkpoint's student weights in place; tied weights may be absent from the file."""
    if is_peft_model(student):
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(student, load_peft_weights(checkpoint, device="cpu"))
        return
    single = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(single):
        state = load_file(single)
    elif os.path.isfile(os.path.join(checkpoint, "model.safetensors.index.json")):
        index = json.loads(Path(checkpoint, "model.safetensors.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(os.path.join(checkpoint, shard)))
    else:
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors (or index) to resume the student from")
    result = student.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in student.state_dict().items() if n in state}
    untied_missing = [k for k in result.missing_keys if student.state_dict()[k].data_ptr() not in loaded]
    if untied_missing or result.unexpected_keys:
        raise RuntimeError(f"{checkpoint}: student weights do not match the model "
                           f"(missing {untied_missing[:5]}, unexpected {result.unexpected_keys[:5]})")


def load_method_state(method: nn.Module, checkpoint: str) -> None:
    """Load the method's projectors/state saved next to the student, if it has any."""
    path = os.path.join(checkpoint, METHOD_WEIGHTS_NAME)
    expected = method.state_to_save()
    if not expected:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint}: missing {METHOD_WEIGHTS_NAME} for method {method.name!r}")
    method.load_state_dict(load_file(path), strict=True)
