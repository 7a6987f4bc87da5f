"""Layer pairs between a student and a teacher of different depth (SRA, MTA): depth, widths, default maps, checks.

Layer numbers index `ModelView.hidden_states`: 0 is the embedding output, ℓ = 1..L the output of block ℓ, and L
(the model's depth) the final hidden state after the final norm, the one the LM head reads. A layer pair (s, t)
aligns student layer s with teacher layer t.

Two default maps, both checked against the real depths when a method is built:
- `proportional_pairs(L_s, L_t, n)`: pair k = 1..n at round(k·L/n) on each side, so the last pair is the two final
  layers and the pairs are spread evenly along both depths (12 ↔ 24 layers, n = 4: 3↔6, 6↔12, 9↔18, 12↔24);
- `top_pairs(L_s, L_t, n, stride)`: the last n layers at `stride` on each side, ending at the final layers
  (SRA's reference recipe: TinyLlama 18, 20, 22 ↔ Mistral 28, 30, 32).
"""

from __future__ import annotations

from typing import Any

from dwakd.modules.projectors import _first_int, model_dims
from dwakd.options import OptionError

_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


def _text_config(config: Any) -> Any:
    """The language model's own config of a composite config (a `text_config` without depth fields at the top)."""
    text = getattr(config, "text_config", None)
    if text is not None and not any(isinstance(getattr(config, k, None), int) for k in _DEPTH_KEYS):
        return text
    return config


def num_layers(config: Any) -> int:
    """Number of transformer blocks L of a Hugging Face causal-LM config (hidden_states has L + 1 entries)."""
    depth = _first_int(_text_config(config), _DEPTH_KEYS)
    if depth is None:
        raise ValueError(f"cannot read the number of layers from {type(config).__name__}: "
                         f"none of {', '.join(_DEPTH_KEYS)} is set")
    return depth


def layer_width(config: Any, layer: int) -> int:
    """Width of hidden_states[layer]: the final layer's is the LM head's input width (OPT projects out of its
    hidden size there), every other layer's is the hidden size."""
    if layer == num_layers(config):
        return model_dims(config).hidden
    width = _first_int(_text_config(config), _WIDTH_KEYS)
    if width is None:
        raise ValueError(f"cannot read the hidden size from {type(config).__name__}")
    return width


def proportional_pairs(student_layers: int, teacher_layers: int, count: int) -> list[tuple[int, int]]:
    """Pairs k = 1..n at round(k·L_s/n) ↔ round(k·L_t/n), n = min(count, L_s, L_t): strictly increasing on
    both sides, the last pair the two final layers."""
    n = min(count, student_layers, teacher_layers)
    return [(_round_half_up(k * student_layers / n), _round_half_up(k * teacher_layers / n)) for k in range(1, n + 1)]


def top_pairs(student_layers: int, teacher_layers: int, count: int, stride: int = 2) -> list[tuple[int, int]]:
    """The last n layers at `stride` on each side, ending at the final layers, none below layer 1."""
    n = min(count, (student_layers - 1) // stride + 1, (teacher_layers - 1) // stride + 1)
    return [(student_layers - stride * (n - 1 - k), teacher_layers - stride * (n - 1 - k)) for k in range(n)]


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def check_layer_pairs(option: str, pairs: Any, lowest: int = 0) -> list[tuple[int, int]] | None:
    """Validate the form of a `layer_pairs` option (None = the method's default map); returns it as tuples.

    Depths are unknown until the models' configs are read: `check_pairs_fit` checks the range then.
    """
    if pairs is None:
        return None
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise OptionError(option, f"must be a non-empty list of [student_layer, teacher_layer] pairs; got {pairs!r}")
    out: list[tuple[int, int]] = []
    for item in pairs:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in item)
        if not ok:
            raise OptionError(option, f"each pair must be [student_layer, teacher_layer] with layers ≥ {lowest} "
                                      f"(0 is the embedding output); got {item!r}")
        out.append((int(item[0]), int(item[1])))
    if len(set(out)) != len(out):
        raise OptionError(option, f"pairs must not repeat; got {pairs!r}")
    return out


def check_pairs_fit(option: str, pairs: list[tuple[int, int]], student_layers: int, teacher_layers: int) -> None:
    """Raise OptionError if a pair names a layer beyond either model's depth."""
    for s, t in pairs:
        if s > student_layers or t > teacher_layers:
            raise OptionError(option, f"pair [{s}, {t}] is out of range: the student has {student_layers} layers "
                                      f"and the teacher {teacher_layers} (valid layers 0..L, L the final one)")
