"""Cosine cost matrices for Soft-DTW: one batched matmul of unit vectors, never a (B, N, M, D) tensor."""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero with finite gradient (rsqrt of a clamped squared norm)."""
    sq = x.pow(2).sum(dim=-1, keepdim=True)
    return x * torch.rsqrt(sq.clamp_min(eps * eps))


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """C(i, j) = 1 − cos(x_i, y_j): (batch, N, D) × (batch, M, D) → (batch, N, M); a zero vector costs 1."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"cosine_cost expects (B, N, D) and (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    return 1.0 - torch.bmm(_unit(x, eps), _unit(y, eps).transpose(1, 2))
