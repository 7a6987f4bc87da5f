"""Token saliency weights and relational (structure) losses between pooled units of two models (SRA, MTA).

Token weights (computed without gradient, at least fp32):
- `last_token_attention`: SRA's — a layer's attention probabilities summed over heads, the row of the last
  non-padding position (which attends to every position of a causal model), normalised to sum to 1;
- `self_similarity_weights`: MTA's parameter-free weights — x̂ = h / std(h) per token (std over the hidden
  dimension, + 1e-5), A = softmax_j(x̂_i·x̂_j / √d) over the other non-padding positions j ≠ i, w_j = mean_i A_ij
  over the non-padding rows i.

Losses, one value per sequence over units k, l of that sequence (unit_mask marks the units that exist):
- `structure_loss`: Σ_{k≠l} π_kl (cos(a_k, a_l) − cos(b_k, b_l))² / Σ_{k≠l} π_kl with π_kl = m_k·m_l — the relative
  geometry of the units on one side against the other (SRA's geometric regulariser, MTA's DSA);
- `weighted_cosine_distance`: Σ_k m_k (1 − cos(a_k, b_k)) / Σ_k m_k (SRA's span alignment, MTA's HRA).
A sequence with no unit (or, for the structure loss, fewer than two) contributes 0.
"""

from __future__ import annotations

import math

import torch

COSINE_EPS = 1e-8  # lower bound of |a|·|b| in a cosine


@torch.no_grad()
def last_token_attention(attention: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, length) weights from one layer's attention (batch, heads, length, length)."""
    summed = attention.to(torch.promote_types(attention.dtype, torch.float32)).sum(1)  # (batch, length, length)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(1).values.clamp_min(0)
    row = summed[torch.arange(summed.shape[0], device=summed.device), last]  # (batch, length)
    row = row * attention_mask.to(row.dtype)
    return row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)


@torch.no_grad()
def self_similarity_weights(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, length) parameter-free saliency of each position from its layer's hidden states (batch, length, d)."""
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    x = h / (h.std(-1, keepdim=True) + 1e-5)
    scores = x @ x.transpose(-1, -2) / math.sqrt(h.shape[-1])  # (batch, length, length)
    valid = attention_mask.bool()
    length = valid.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    allowed = valid.unsqueeze(1) & ~eye  # column j valid and j ≠ i
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no allowed column (one-token sequence) → 0
    rows = valid.to(attn.dtype).unsqueeze(-1)
    return (attn * rows).sum(1) / rows.sum(1).clamp_min(1.0)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(batch, K, K) cosine similarity between every two of the K vectors (batch, K, d)."""
    norms = x.norm(dim=-1)
    return (x @ x.transpose(-1, -2)) / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp_min(COSINE_EPS)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(COSINE_EPS)


def structure_loss(a: torch.Tensor, b: torch.Tensor, masses: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) mass-pair-weighted squared difference of the two sides' cosine matrices, off the diagonal.

    a (batch, K, d_a) and b (batch, K, d_b) are the same K units on each side, masses (batch, K) ≥ 0 (no gradient).
    """
    m = (masses * unit_mask).detach()
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)
    pair = pair * ~torch.eye(pair.shape[-1], dtype=torch.bool, device=pair.device)
    diff = (cosine_matrix(a) - cosine_matrix(b.to(a.dtype))) ** 2
    total = pair.sum((-2, -1))
    return (pair * diff).sum((-2, -1)) / total.clamp_min(torch.finfo(total.dtype).tiny)


def weighted_cosine_distance(a: torch.Tensor, b: torch.Tensor, masses: torch.Tensor,
                             unit_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) Σ_k m_k (1 − cos(a_k, b_k)) / Σ_k m_k over the units that exist."""
    m = (masses * unit_mask).detach()
    total = m.sum(-1)
    return (m * (1 - cosine(a, b.to(a.dtype)))).sum(-1) / total.clamp_min(torch.finfo(total.dtype).tiny)
