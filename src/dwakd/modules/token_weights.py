"""Dual-space token weights of DWA-KD (paper §3.2): where the student is unsure and the teacher is sure.

docs/methods.md#51-token-weights.

- student space, position i:  w_i = Ĥ_s(i) · g_i with Ĥ_s(i) = H(softmax(z_s,i)) / log V_s and the gate
  g_i = max_v softmax(t2s_logits_i)_v (the teacher's peak confidence projected into the student vocabulary);
- teacher space, position j:  u_j = 1 − H(softmax(z_t,j)) / log V_t.

Both are computed without gradient, at temperature 1 (the paper writes them on the raw softmax), on the real vocabulary
only (head padding rows sliced off), and rescaled per sequence so they sum to that sequence's valid-token count.
Choice (the paper is silent; docs/methods.md#56-choices-and-departures): a sequence whose raw weights sum to 0
gets weight 1 on every valid token (plain average).
Entropies and peaks come from `dwakd.ops.row_stats` (on CPU a numba kernel: a max pass and one summing pass per
row; chunked over rows elsewhere), so no (tokens, vocab) temporary outlives one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dwakd.modules.divergences import compute_dtype, flat_rows
from dwakd.modules.rows import valid_rows
from dwakd.ops.row_stats import row_entropy_peak


def _rows_for(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Rows of the valid positions for dense (batch, length, V) logits; None for rows already gathered."""
    if logits.dim() == 3:
        return valid_rows(mask)
    if logits.dim() != 2:  # a wrong row count fails in scatter_valid (no device sync here to check it)
        raise ValueError(f"logits must be (batch, length, V) or (positions, V), got shape {tuple(logits.shape)}")
    return None


@torch.no_grad()
def normalized_entropy(
    logits: torch.Tensor, rows: torch.Tensor | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """H(softmax(z)) / log V per selected row (positions,), fp32, no grad; V = `vocab_size` or the last axis."""
    vocab = logits.shape[-1] if vocab_size is None else vocab_size
    if vocab < 2:
        raise ValueError(f"normalised entropy needs a vocabulary of at least 2 tokens, got {vocab}")
    entropy, _ = row_entropy_peak(flat_rows(logits), rows, vocab)
    return entropy / math.log(vocab)


@torch.no_grad()
def peak_probability(
    logits: torch.Tensor, rows: torch.Tensor | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """max_v softmax(z)_v per selected row (positions,), fp32, no grad."""
    vocab = logits.shape[-1] if vocab_size is None else vocab_size
    _, peak = row_entropy_peak(flat_rows(logits), rows, vocab)
    return peak


def scatter_valid(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place (positions,) values on the (batch, length) grid of `mask`, zeros elsewhere."""
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)  # (batch, length)
    dense[mask] = values
    return dense


@torch.no_grad()
def rescale_per_sequence(raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, length) weights scaled per row so each row sums to its count of valid positions; 0 where invalid."""
    raw = raw.to(compute_dtype(raw))
    raw = torch.where(mask, raw, torch.zeros_like(raw))
    count = mask.sum(-1, keepdim=True).to(raw.dtype)  # (batch, 1)
    total = raw.sum(-1, keepdim=True)  # (batch, 1)
    scaled = raw * (count / total.clamp_min(torch.finfo(raw.dtype).tiny))
    uniform = mask.to(raw.dtype)
    return torch.where(total > 0, scaled, uniform)


@dataclass
class TokenWeights:
    """Weights on the (batch, length) grid of one side: rescaled (used by the loss) and raw (for logging)."""

    weights: torch.Tensor  # (batch, length) fp32, rows sum to the valid count, 0 at invalid positions
    raw: torch.Tensor  # (batch, length) fp32 before rescaling, 0 at invalid positions


def student_token_weights(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int,
    gate: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> TokenWeights:
    """w_i = Ĥ_s(i)·g_i rescaled per sequence; `gate` is (positions,) at the valid positions, None means g ≡ 1.

    `student_logits` is the dense (batch, n, V) tensor, or (K, V) rows: with `rows` (positions,) given, the rows
    of it at the valid positions of `mask` in row-major order; without, exactly those rows in that order.
    """
    rows = _rows_for(student_logits, mask) if rows is None else rows
    entropy = normalized_entropy(student_logits, rows, vocab_size)  # (positions,)
    raw_valid = entropy if gate is None else entropy * gate.detach().to(entropy.dtype)
    raw = scatter_valid(raw_valid, mask)
    return TokenWeights(weights=rescale_per_sequence(raw, mask), raw=raw)


def weights_at_rows(raw_rows: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> TokenWeights:
    """Raw weights given per row (K,) at flat positions `rows` of `mask`'s (batch, length) grid, rescaled per
    sequence like `student_token_weights` (for weights from per-row statistics instead of logits; every row must
    be a True entry of `mask`, and the rows together cover it)."""
    raw = torch.zeros(mask.numel(), dtype=raw_rows.dtype, device=raw_rows.device)
    raw = raw.index_copy(0, rows, raw_rows.detach()).view(mask.shape)
    return TokenWeights(weights=rescale_per_sequence(raw, mask), raw=raw)


def teacher_token_weights(
    teacher_logits: torch.Tensor, mask: torch.Tensor, vocab_size: int, rows: torch.Tensor | None = None
) -> TokenWeights:
    """u_j = 1 − Ĥ_t(j) rescaled per sequence; logits and `rows` as for `student_token_weights`."""
    rows = _rows_for(teacher_logits, mask) if rows is None else rows
    confidence = 1.0 - normalized_entropy(teacher_logits, rows, vocab_size)
    raw = scatter_valid(confidence.clamp_min(0.0), mask)
    return TokenWeights(weights=rescale_per_sequence(raw, mask), raw=raw)
