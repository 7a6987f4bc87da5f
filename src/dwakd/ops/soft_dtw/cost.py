"""Cosine cost matrices for Soft-DTW: one batched matmul of unit vectors, never a (B, N, M, D) tensor.

`cosine_cost(x, y)` is the plain form. `divergence_costs(x, y)` gives the three cost batches of the Soft-DTW
divergence with less work than three `cosine_cost` calls: each side is normalised once, and a self term
C = 1 − u·uᵀ is one matmul forward and one backward, where autograd's matmul backward takes two. Its backward is
dL/du = −(G + Gᵀ)·u, and −2·G·u when the caller promises a symmetric G: Soft-DTW's gradient E = ∂R/∂C is
symmetric at a symmetric cost with equal lengths (R(Cᵀ) = R(C)), and the CPU path mirrors it exactly. That is 7
batched matmuls for the divergence's costs instead of 9, the bulk of its work besides the DPs.
"""

from __future__ import annotations

import torch

from dwakd.ops.autocast import matmul_dtype

COSINE_EPS = 1e-8  # rows with a norm below this are scaled by 1/eps (a zero row stays zero: cost 1 to everything)


class _UnitRows(torch.autograd.Function):
    """u = x·rsqrt(max(|x|², eps²)) per row, with the normalisation's Jacobian as one expression in backward:
    dL/dx = (g − u·(u·g))·rsqrt(·) where the norm is not clamped and g·rsqrt(·) where it is (the gradient autograd
    gives the plain formula; its graph of pow, sum, clamp, rsqrt and mul took eight (rows, D) passes and
    temporaries backward, a sixth of a Soft-DTW divergence call at B=8, N=M=256, D=64). With create_graph the same
    expression is formed from x by differentiable ops, so higher derivatives are autograd's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        sq = x.pow(2).sum(dim=-1, keepdim=True)
        inv = torch.rsqrt(sq.clamp_min(eps * eps))
        u = x * inv
        ctx.save_for_backward(x, u, inv, sq >= eps * eps)  # exactly at eps a convention (torch versions differ)
        ctx.eps = eps
        return u

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        x, u, inv, unclamped = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: u and rsqrt as functions of x, recorded by autograd
            inv = torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True).clamp_min(ctx.eps * ctx.eps))
            u = x * inv
            return (grad - u * ((u * grad).sum(dim=-1, keepdim=True) * unclamped)) * inv, None
        dot = (u * grad).sum(dim=-1, keepdim=True).mul_(unclamped)
        return grad.addcmul(u, dot, value=-1.0).mul_(inv), None


def unit_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero with finite gradient (rsqrt of a clamped squared norm)."""
    return _UnitRows.apply(x, eps)


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{name} expects (B, N, D) and (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}")


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """C(i, j) = 1 − cos(x_i, y_j): (batch, N, D) × (batch, M, D) → (batch, N, M); a zero vector costs 1."""
    _check_pair(x, y, "cosine_cost")
    return 1.0 - torch.bmm(unit_rows(x, eps), unit_rows(y, eps).transpose(1, 2))


class _SelfCost(torch.autograd.Function):
    """C = 1 − u·uᵀ of (batch, N, D) rows u; backward dL/du = −(G + Gᵀ)·u in one matmul (autograd would form
    G·u and Gᵀ·u separately: the same product twice when G is symmetric, as a self term's Soft-DTW gradient is),
    or −2·G·u with `symmetric_grad` (no transposed read of G). Under autocast the matmuls run in its dtype, as
    `torch.bmm` would, and the gradient returns in u's dtype."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, symmetric_grad: bool) -> torch.Tensor:  # type: ignore[override]
        device = u.device.type
        mm = u.to(matmul_dtype(u))
        ctx.save_for_backward(mm)
        ctx.input_dtype = u.dtype
        ctx.symmetric_grad = symmetric_grad
        with torch.autocast(device, enabled=False):
            return one_minus_gram(mm, mm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mm,) = ctx.saved_tensors
        grad = grad.to(mm.dtype)
        if ctx.symmetric_grad:
            return torch.bmm(grad, mm).mul_(-2.0).to(ctx.input_dtype), None
        return torch.bmm(grad + grad.transpose(1, 2), mm).neg_().to(ctx.input_dtype), None


def one_minus_gram(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1 − a·bᵀ per batch, (batch, N, M), as one baddbmm (no separate subtraction pass), into `out` if given."""
    ones = a.new_ones(()).expand(a.shape[0], a.shape[1], b.shape[1])
    return torch.baddbmm(ones, a, b.transpose(1, 2), alpha=-1.0, out=out)


def self_cosine_cost(x: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """cosine_cost(x, x) with a one-matmul backward: (batch, N, D) → (batch, N, N)."""
    _check_pair(x, x, "self_cosine_cost")
    return _SelfCost.apply(unit_rows(x, eps), False)


def divergence_costs(
    x: torch.Tensor, y: torch.Tensor, eps: float = COSINE_EPS, symmetric_self_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C_xy, C_xx, C_yy) = (cosine_cost(x, y), cosine_cost(x, x), cosine_cost(y, y)), each side normalised once
    and the self terms through `_SelfCost`; `symmetric_self_grad`: the self terms' upstream gradients will be
    symmetric (a self term's Soft-DTW gradient), so their backward is −2·G·u."""
    _check_pair(x, y, "divergence_costs")
    ux, uy = unit_rows(x, eps), unit_rows(y, eps)
    return (one_minus_gram(ux, uy), _SelfCost.apply(ux, symmetric_self_grad),
            _SelfCost.apply(uy, symmetric_self_grad))
