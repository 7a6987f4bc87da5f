"""Per-chunk math of the fused head + divergence op: KL-family values, their logit gradients, CE and statistics.

Everything here works on one chunk of rows of logits, (rows, V) in fp32 or float64, and returns per-row values
or a (rows, V) gradient. Inputs marked "consumed" are overwritten in place to keep at most a few (rows, V)
temporaries alive per chunk.

With log q = log softmax(s / τ) (prediction) and log p = log softmax(t / τ) (target), the divergences are those of
`docs/methods.md` (the KL family): fkl Σ p(log p − log q), rkl Σ q(log q − log p), sfkl/srkl with the skew λ,
js with M = (p + q)/2, akl with the head/tail gap weights of Wu et al. 2024 (no gradient through those weights).
Every gradient is w.r.t. the *scaled* prediction logits s / τ; the caller divides by τ. For all but fkl it has
the softmax-Jacobian form q ⊙ (a − ⟨q, a⟩) with a = ∂D/∂q, and ⟨q, a⟩ is often the value itself (reused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dwakd.modules.divergences import akl_mix, row_dot, softmax_vjp_

DIVERGENCES = ("fkl", "rkl", "sfkl", "srkl", "js", "akl")


@dataclass(frozen=True)
class DivergenceSpec:
    """Which KL-family divergence, at which temperature, with its constants."""

    kind: str
    temperature: float = 1.0
    skew_lambda: float = 0.1
    akl_alpha: float = 0.5


def log_softmax_(z: torch.Tensor, tau: float) -> torch.Tensor:
    """`dwakd.modules.divergences.log_probs` computed in place in `z` (which it consumes): no second (rows, V)
    tensor stays alive."""
    if tau != 1.0:
        z.mul_(1.0 / tau)
    z.sub_(torch.logsumexp(z, -1, keepdim=True))
    return z.clamp_(min=torch.finfo(z.dtype).min)


def divergence_value_and_grad(
    log_q: torch.Tensor, log_p: torch.Tensor, spec: DivergenceSpec, want_value: bool, want_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row D(p → q) (rows,) and/or its gradient (rows, V) w.r.t. the scaled prediction logits.

    `log_q` and `log_p` are consumed. Sharing the pass between value and gradient is what lets the op form the
    gradient during forward (no recomputation) when nothing asks for the head weight's gradient.
    """
    kind, lam = spec.kind, spec.skew_lambda
    value = grad = None
    if kind == "fkl":
        p = log_p.exp()
        if want_value:
            value = row_dot(p, log_p.sub_(log_q))
        if want_grad:
            grad = log_q.exp_().sub_(p)  # q − p
        return value, grad
    if kind == "rkl":
        a = log_q.sub(log_p)  # log q − log p = ∂D/∂q − 1 (the 1 cancels in the softmax Jacobian)
        q = log_q.exp_()
        value = row_dot(q, a)  # = ⟨q, a⟩, needed by the gradient too
        if want_grad:
            grad = softmax_vjp_(q, a, value)
        return (value if want_value else None), grad
    if kind in ("sfkl", "srkl"):
        if kind == "sfkl":  # log m = log(λ p + (1 − λ) q)
            log_m = torch.logaddexp(log_p + math.log(lam), log_q + math.log1p(-lam)) if lam > 0 else log_q.clone()
            if want_value:
                value = row_dot(log_p.exp(), log_p - log_m)
            if want_grad:
                a = log_p.sub_(log_m).exp_().mul_(-(1.0 - lam))  # ∂D/∂q = −(1 − λ) p / m
                grad = softmax_vjp_(log_q.exp_(), a)
            return value, grad
        # srkl: log m = log((1 − λ) p + λ q)
        log_m = torch.logaddexp(log_p + math.log1p(-lam), log_q + math.log(lam)) if lam > 0 else log_p
        d = log_q.sub(log_m)  # log q − log m
        q = log_q.exp_()
        if want_value:
            value = row_dot(q, d)
        if want_grad:
            a = d.sub_(d.exp().mul_(lam)) if lam > 0 else d  # ∂D/∂q − 1 = log q − log m − λ q / m
            grad = softmax_vjp_(q, a)
        return value, grad
    if kind == "js":
        log_mid = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
        if want_value:
            value = 0.5 * row_dot(log_p.exp(), log_p - log_mid)
        a = log_q.sub(log_mid)  # log q − log M; the p/M and q/M terms cancel: (p + q)/(2M) = 1
        q = log_q.exp_()
        if want_value:
            value = value + 0.5 * row_dot(q, a)
        if want_grad:
            grad = softmax_vjp_(q, a.mul_(0.5))
        return value, grad
    if kind == "akl":
        p, q = log_p.exp(), log_q.exp()
        w_head, w_tail = akl_mix(p, q, spec.akl_alpha)
        diff = log_p.sub_(log_q)  # log p − log q
        fkl, rkl = row_dot(p, diff), -row_dot(q, diff)
        if want_value:
            value = w_head * fkl + w_tail * rkl
        if want_grad:
            rkl_grad = softmax_vjp_(q, diff.neg_(), rkl)  # a = log q − log p, ⟨q, a⟩ = rkl
            grad = rkl_grad.mul_(w_tail.unsqueeze(-1)).add_((q - p).mul_(w_head.unsqueeze(-1)))
        return value, grad
    raise ValueError(f"unknown divergence {kind!r}")  # pragma: no cover - the wrapper validates


def cross_entropy_rows(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log prob(label) per row (rows,) from log-probabilities; 0 where the label is negative (ignored)."""
    keep = labels >= 0
    picked = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, -picked, torch.zeros_like(picked))


def cross_entropy_grad_(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(softmax − one-hot(label)) per row, zero rows where the label is ignored; `log_probs` is consumed."""
    grad = log_probs.exp_()
    keep = labels >= 0
    grad.scatter_add_(-1, labels.clamp_min(0).unsqueeze(-1), torch.full_like(grad[:, :1], -1.0))
    return grad.mul_(keep.unsqueeze(-1).to(grad.dtype))


def entropy_rows(log_probs: torch.Tensor) -> torch.Tensor:
    """H = −Σ p log p per row (rows,), in nats."""
    return -row_dot(log_probs.exp(), log_probs)
