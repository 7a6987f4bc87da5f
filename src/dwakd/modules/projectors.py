"""Learnable projectors of DSKD-CMA (docs/methods.md#4-dskd-cma): t2s, s2t and query, sized from the model configs.

Sizes come from the model configs, so the projectors exist (and are in the optimiser) before the first batch.
Two sizes are read per model, because they can differ:

- `hidden`: the width of the final hidden state the LM head reads (hidden_states[-1]). For OPT that is
  `word_embed_proj_dim` (OPT projects out of `hidden_size` before its final hidden state and head).
- `embedding`: the width of the input-embedding table (OPT's `word_embed_proj_dim`, `hidden_size` elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelDims:
    """Widths a method needs from one model: final hidden state (head input) and input-embedding table."""

    hidden: int
    embedding: int


def _first_int(config: Any, names: tuple[str, ...]) -> int | None:
    """The first of `names` set on `config` as a positive int, else None."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_dims(config: Any) -> ModelDims:
    """Hidden and embedding widths of a Hugging Face causal-LM config (GPT-2, OPT, Llama, Qwen, Mistral, ...)."""
    text_config = getattr(config, "text_config", None)
    if text_config is not None and _first_int(config, ("hidden_size", "n_embd", "d_model")) is None:
        config = text_config
    hidden = _first_int(config, ("hidden_size", "n_embd", "d_model"))
    if hidden is None:
        raise ValueError(
            f"cannot read the hidden size from {type(config).__name__}: none of hidden_size / n_embd / d_model is set"
        )
    proj = _first_int(config, ("word_embed_proj_dim",))  # OPT: embedding table and head width
    embedding = proj if proj is not None else _first_int(config, ("embedding_size",)) or hidden
    head_input = proj if proj is not None else hidden
    return ModelDims(hidden=head_input, embedding=embedding)


class DualSpaceProjectors(nn.Module):
    """t2s Linear(d_t→d_s), s2t Linear(d_s→d_t), query Linear(2e_s→2e_t) of DSKD-CMA.

    d is the final-hidden width and e the embedding width of each side (equal except for some OPT sizes).
    The creation order (t2s, s2t, query) is fixed so that two methods built after the same seed get identical
    initial weights for the projectors they share. Default `nn.Linear` initialisation, all with bias.
    """

    def __init__(self, student: ModelDims, teacher: ModelDims):
        super().__init__()
        if teacher.embedding != teacher.hidden:
            raise ValueError(
                f"DSKD-CMA adds the teacher's normalised final hidden state ({teacher.hidden}) to its target "
                f"embedding ({teacher.embedding}); these widths must match. Use a teacher whose embedding width "
                "equals its final hidden width."
            )
        self.student_dims = student
        self.teacher_dims = teacher
        self.t2s = nn.Linear(teacher.hidden, student.hidden)
        self.s2t = nn.Linear(student.hidden, teacher.hidden)
        self.query = nn.Linear(2 * student.embedding, 2 * teacher.embedding)
