"""Plain-PyTorch reference of `fused_head_kd`: dense (rows, V) logits, textbook formulas, autograd for gradients.

The ground truth for the fused op in tests and the "plain" side of `benchmarks/kd_loss.py`. It forms both sides'
logits in full with `F.linear` (so autocast behaves as in the methods: bf16 logits under bf16 autocast), promotes
them to fp32 (float64 stays float64) and writes each divergence from its definition on probabilities; autograd
derives every gradient. Memory is several (rows, V) tensors per side: use it for checking, not for training.
`sorted_l1_reference` and `label_log_probs_reference` / `head_label_log_probs_reference` are the same for ULD's
sorted L1 and ALM's label log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F

from dwakd.ops.fused_kd.functional import FusedKDRows


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, vocab) logits in at least fp32; the hidden is cast to the head's dtype as the methods do."""
    z = F.linear(hidden.to(weight.dtype), weight[:vocab])
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if bias is None else z + bias[:vocab].to(z.dtype)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per row from log-probabilities: Σ a (log a − log b)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def reference_divergence(s: torch.Tensor, t: torch.Tensor, kind: str, tau: float, lam: float = 0.1,
                         alpha: float = 0.5) -> torch.Tensor:
    """D(softmax(t/τ) → softmax(s/τ)) per row, differentiable w.r.t. s (t is used as given)."""
    log_q, log_p = torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1)
    q, p = log_q.exp(), log_p.exp()
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "sfkl":
        return _kl(log_p, torch.log(lam * p + (1 - lam) * q))
    if kind == "srkl":
        return _kl(log_q, torch.log((1 - lam) * p + lam * q))
    if kind == "js":
        log_mid = torch.log(0.5 * (p + q))
        return 0.5 * _kl(log_p, log_mid) + 0.5 * _kl(log_q, log_mid)
    if kind == "akl":
        with torch.no_grad():  # gap weights are constants (DSKD, Wu et al. 2024)
            p_sorted, order = torch.sort(p, dim=-1)
            gap = (p_sorted - q.gather(-1, order)).abs()
            tail = torch.cumsum(p_sorted, -1) <= alpha
            g_tail = torch.where(tail, gap, torch.zeros_like(gap)).sum(-1)
            g_head = torch.where(tail, torch.zeros_like(gap), gap).sum(-1)
            total = g_head + g_tail
            w_head = torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))
            w_tail = torch.where(total > 0, g_tail / total, torch.full_like(total, 0.5))
        return w_head * _kl(log_p, log_q) + w_tail * _kl(log_q, log_p)
    raise ValueError(f"unknown divergence {kind!r}")


def _cross_entropy(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """−log softmax(z/τ)(y) per row, 0 for ignored (negative) labels."""
    return F.cross_entropy(z / tau, labels, ignore_index=-100, reduction="none")


def _statistics(z: torch.Tensor, prefix: str, names: frozenset[str]) -> dict[str, torch.Tensor]:
    """Entropy (nats), peak probability and argmax of softmax(z) at τ = 1, without gradient."""
    with torch.no_grad():
        p = torch.softmax(z, -1)
        out = {
            f"{prefix}_entropy": -torch.special.xlogy(p, p).sum(-1),
            f"{prefix}_peak": p.max(-1).values,
            f"{prefix}_argmax": z.argmax(-1),
        }
    return {k: v for k, v in out.items() if k in names}


def head_kd_reference(
    pred_hidden: torch.Tensor,
    pred_weight: torch.Tensor,
    target_hidden: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
    *,
    vocab_size: int,
    divergence: str | None = "fkl",
    temperature: float = 1.0,
    pred_labels: torch.Tensor | None = None,
    target_labels: torch.Tensor | None = None,
    ce_temperature: float = 1.0,
    statistics: Collection[str] = (),
    target_bias: torch.Tensor | None = None,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
) -> FusedKDRows:
    """Same contract as `dwakd.ops.fused_kd.fused_head_kd`, computed densely with autograd."""
    names = frozenset(statistics)
    s = _head_logits(pred_hidden, pred_weight, vocab_size)  # (rows, V) with grad to pred_hidden, pred_weight
    out = FusedKDRows(**_statistics(s, "pred", names))
    if pred_labels is not None:
        out.pred_ce = _cross_entropy(s, pred_labels, ce_temperature)
    if target_hidden is not None:
        t = _head_logits(target_hidden, target_weight, vocab_size, target_bias)  # grad to target_hidden only
        for key, value in _statistics(t, "target", names).items():
            setattr(out, key, value)
        if target_labels is not None:
            out.target_ce = _cross_entropy(t, target_labels, ce_temperature)
        if divergence is not None:
            out.divergence = reference_divergence(s, t.detach(), divergence, temperature, skew_lambda, akl_alpha)
    return out


def sorted_l1_reference(z_s: torch.Tensor, z_t: torch.Tensor, s_vocab: int, t_vocab: int) -> torch.Tensor:
    """ULD's distance per row from its definition: softmax over the real vocabularies (at least fp32), `torch.sort`
    in decreasing order, zero-padding to the larger vocabulary, L1; autograd differentiates through the sort's
    values w.r.t. z_s (z_t is a fixed target). The ground truth of `dwakd.ops.fused_kd.sorted_l1`."""
    dtype = torch.promote_types(z_s.dtype, torch.float32)
    p = torch.softmax(z_s[:, :s_vocab].to(dtype), -1).sort(-1, descending=True).values
    q = torch.softmax(z_t[:, :t_vocab].detach().to(dtype), -1).sort(-1, descending=True).values
    width = max(s_vocab, t_vocab)
    p = F.pad(p, (0, width - s_vocab))
    q = F.pad(q, (0, width - t_vocab))
    return (p - q).abs().sum(-1)


def label_log_probs_reference(logits: torch.Tensor, labels: torch.Tensor, vocab: int,
                              space_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch `label_log_probs`: per row log softmax(z)[label] and log Σ_{v∈S} softmax(z)_v (zeros without
    a space set) over the first `vocab` columns, at least fp32; keeps a (rows, vocab) log-softmax for backward."""
    log_p = torch.log_softmax(logits[:, :vocab].to(torch.promote_types(logits.dtype, torch.float32)), -1)
    label_lp = log_p.gather(1, labels[:, None]).squeeze(1)
    if space_mask is None:
        return label_lp, torch.zeros_like(label_lp)
    return label_lp, torch.logsumexp(log_p.masked_fill(~space_mask, -math.inf), -1)


def head_label_log_probs_reference(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, labels: torch.Tensor,
                                   space_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`label_log_probs_reference` of `F.linear` logits: the ground truth of `fused_head_label_log_probs`."""
    return label_log_probs_reference(_head_logits(hidden, weight, vocab), labels, vocab, space_mask)


def head_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows,) −Σ p log p of softmax over dense `F.linear` logits: the ground truth of `head_columns.head_entropy`."""
    return _statistics(_head_logits(hidden, weight, vocab), "head", frozenset({"head_entropy"}))["head_entropy"]


def head_topk_reference(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, k: int) -> torch.Tensor:
    """(rows, min(k, vocab)) `torch.topk` indices of dense logits: the ground truth of `head_columns.head_topk`."""
    return _head_logits(hidden, weight, vocab).detach().topk(min(k, vocab), dim=-1).indices


def gathered_head_logits_reference(hidden: torch.Tensor, weight: torch.Tensor, vocab: int,
                                   cols: torch.Tensor) -> torch.Tensor:
    """(rows, C) dense logits gathered at `cols`, autograd for the gradients: the ground truth of
    `head_columns.gathered_head_logits`."""
    return _head_logits(hidden, weight, vocab).gather(1, cols)
