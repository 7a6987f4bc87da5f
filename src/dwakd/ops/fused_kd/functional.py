"""Fused LM head + KL-family divergence: per-row divergence, CE and statistics from hidden states and head weights.

One op for every "head + divergence" term of the dual-space methods: it takes the hidden states of a prediction
side and of a target side with their LM-head weights, forms the (rows, V) logits chunk by chunk, and returns per
row the divergence D(target → prediction) at temperature τ, the cross-entropy of either side, and τ = 1 statistics
(entropy, peak probability, argmax) of either side, without ever holding a (rows × V) tensor for all rows.

Design (what and why):
- **Per-row outputs, weights applied outside.** The op returns (rows,) tensors; token weights, masks and the
  per-sequence rescaling of DWA-KD are ordinary autograd outside (`(w * rows.divergence).sum()`). The weights
  depend on statistics of the same logits (student entropy, teacher peak, argmax correctness), so they cannot be
  known before the pass; a scalar-output op with the gradient formed in forward (Liger-Kernel's
  `fused_linear_cross_entropy` / `fused_linear_jsd`) would need them up front, i.e. a second pass over the heads.
- **Backward: store or recompute, picked per call** (`backward="auto"`).
  *store*: when the prediction head weight takes no gradient (the frozen teacher head of the teacher-space term;
  a frozen or LoRA student head), forward also forms, per chunk, the gradient of each differentiable per-row
  output w.r.t. its hidden row — (rows, hidden) each, as Liger keeps `grad_input` — and backward is a weighted
  sum of those: no second matmul over the vocabulary. This is the cheap path for the 151k-token teacher head.
  *recompute*: when the prediction head weight is trained (the student head, often tied to the embeddings), its
  gradient Σ_i a_i g_iᵀ h_i needs the output gradients a_i, known only in backward; forward keeps only its inputs
  and backward recomputes each chunk's logits, forms g, and accumulates the head gradient in place
  (`addmm_`) into one (V, hidden) buffer. Costs one more pass over the head, no (rows, V) storage.
- **One matmul for both sides when they share a head** (z_s and t2s use W_s, s2t and z_t use W_t): the two
  chunks of hidden rows are stacked, so the head is streamed once per chunk, not twice.
- **Matmul chunks, elementwise blocks.** Rows go through the head in chunks of `chunk_elements // V` rows per
  side: large, because a CPU BLAS streams (packs) the whole 50k–152k-row head once per call, so a product over
  fewer than ~400 rows runs 1.3–1.6× slower per row than over 1024 (measured on the 2-core runner). Inside a
  chunk, every softmax, divergence, CE and statistic runs on blocks of `block_elements // V` rows (8 MiB of
  logits), whose temporaries are small and stay in cache; the logit gradients are written back in place of the
  chunk's logits, and the chunk then meets the head in one matmul per gradient. Alive at a time: the chunk's
  logits of both sides (2 × 128 MiB by default), the block temporaries, and in store mode a buffer per CE
  gradient.
- **No vocabulary chunks.** An online log-sum-exp over vocabulary blocks would not pay on CPU: sfkl/srkl/js need
  normalised p and q inside the log-mixture and akl sorts whole rows, so those would need two matmul passes
  over the head, which is the dominant cost here (a row of 50k–152k fp32 logits is only 0.2–0.6 MB).
- **Precision.** The matmul runs as the plain reference's `F.linear` would: in the autocast dtype when autocast
  is on (bf16 logits, as the methods get today), else in the head weight's dtype (the hidden is cast to it).
  Logits are then promoted to fp32 (float64 stays float64) and every softmax, divergence, CE and statistic is
  computed there with autocast off. Gradients w.r.t. hidden states are matmuls in that same dtype; the head
  gradient is accumulated in the head weight's dtype.
- **τ = 1 statistics at τ ≠ 1.** Entropies (and a peak asked for with them) are read from the raw logits by
  `dwakd.ops.row_stats.row_entropy_peak`: on CPU a numba pass that forms no (rows, V) temporary, on CUDA one
  Triton launch per block reading each row once, elsewhere the same chunked log-softmax, exp and row dot product
  as before (at τ = 1 they come from the divergence's own log-probabilities).
- **Heads with padding rows.** Only the first `vocab_size` rows of each head enter (views, no copy); the head
  gradient has the full head's shape with zeros on the padding rows. `target_bias` adds a constant per
  vocabulary entry to the target logits (MinED's −1e5 on unmapped student tokens).
- **What gets gradients.** The divergence and the prediction CE: w.r.t. `pred_hidden` and `pred_weight`. The
  target CE: w.r.t. `target_hidden`. The divergence treats the target as a fixed distribution (no gradient to
  `target_hidden`), and `target_weight` / `target_bias` never get one (pass them detached). Statistics carry none.

The plain PyTorch reference is `dwakd.ops.fused_kd.reference.head_kd_reference` (dense logits, autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from dwakd.modules.divergences import log_probs
from dwakd.ops.autocast import matmul_dtype
from dwakd.ops.fused_kd.chunk_math import (
    DIVERGENCES,
    DivergenceSpec,
    cross_entropy_grad_,
    cross_entropy_rows,
    divergence_value_and_grad,
    entropy_rows,
    log_softmax_,
)
from dwakd.ops.row_stats import row_entropy_peak

CHUNK_ELEMENTS = 1 << 25  # logits per side per matmul chunk: 128 MiB in fp32
BLOCK_ELEMENTS = 1 << 21  # logits per block of the elementwise math inside a chunk: 8 MiB in fp32
STATISTICS = ("pred_entropy", "pred_peak", "pred_argmax", "target_entropy", "target_peak", "target_argmax")
BACKWARD_MODES = ("auto", "store", "recompute")
_OUTPUTS = ("divergence", "pred_ce", "target_ce") + STATISTICS


@dataclass
class FusedKDRows:
    """Per-row results (rows,) of `fused_head_kd`; a field is None when it was not asked for.

    divergence, pred_ce and target_ce are differentiable (compute dtype: fp32, or float64 for float64 inputs);
    entropies (nats) and peaks (max probability) are at τ = 1 on the real vocabulary, without gradient;
    argmaxes are int64 token ids.
    """

    divergence: torch.Tensor | None = None
    pred_ce: torch.Tensor | None = None
    target_ce: torch.Tensor | None = None
    pred_entropy: torch.Tensor | None = None
    pred_peak: torch.Tensor | None = None
    pred_argmax: torch.Tensor | None = None
    target_entropy: torch.Tensor | None = None
    target_peak: torch.Tensor | None = None
    target_argmax: torch.Tensor | None = None


@dataclass(frozen=True)
class _Plan:
    """Everything the autograd function needs besides tensors."""

    divergence: DivergenceSpec | None
    vocab: int
    ce_temperature: float
    stats: frozenset[str]
    chunk: int  # rows per matmul chunk
    block: int  # rows per block of elementwise math inside a chunk
    store: bool  # form hidden-state gradients in forward (True) or recompute in backward (False)
    pred_mm: torch.dtype  # matmul dtypes of the two heads
    target_mm: torch.dtype | None
    compute: torch.dtype  # dtype of logits once promoted: fp32 or float64


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def _head_rows(weight: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(vocab, hidden) real-token rows of a head in the matmul dtype (a view when no cast is needed)."""
    return weight[:vocab].to(dtype)


LOGIT_SLICES = 8  # vocabulary slices of a 16-bit chunk product, each promoted into the chunk's logits as it is made


def _logits(hidden: torch.Tensor, head: torch.Tensor, compute: torch.dtype,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, vocab) logits of a chunk of hidden rows, promoted to the compute dtype (+ bias there).

    A 16-bit product (bf16 autocast, a bf16 head) is formed in `LOGIT_SLICES` vocabulary slices, each promoted into
    the compute-dtype logits at once: a whole-chunk 16-bit product next to its promotion held half the chunk's bytes
    more at the op's peak (+122 MiB, 537 → 659 MiB, for a DSKD pass of the tiny recipe under bf16 autocast). Each
    logit is the same dot product either way; the head is still streamed once per chunk, and every slice keeps all
    of the chunk's rows (what a CPU GEMM needs to run at speed).
    """
    hidden = hidden.to(head.dtype)
    if head.dtype == compute:
        out = torch.mm(hidden, head.t())
    else:
        out = torch.empty(hidden.shape[0], head.shape[0], dtype=compute, device=hidden.device)
        for cols in _vocab_slices(head.shape[0]):
            out[:, cols].copy_(torch.mm(hidden, head[cols].t()))
    return out if bias is None else out.add_(bias)


def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether `b` views exactly the same data as `a` (the student head used on both sides of the t2s term)."""
    return (b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _chunk_logits(pred_rows: torch.Tensor | None, target_rows: torch.Tensor | None, pred_head: torch.Tensor,
                  target_head: torch.Tensor | None, compute: torch.dtype, bias: torch.Tensor | None,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(pred logits, target logits, joint storage) of one chunk; each side (rows, V), None when not asked for.

    When both sides are asked for and use the same head (the student head for z_s and t2s, the teacher head for
    s2t and z_t), one matmul over the stacked rows forms them and the third value is that (2·rows, V) tensor
    (pred rows first): the head is streamed once instead of twice, and backward can reuse the stacking.
    """
    if pred_rows is not None and target_rows is not None and target_head is pred_head:
        rows = pred_rows.shape[0]
        stacked = torch.cat([pred_rows.to(pred_head.dtype), target_rows.to(pred_head.dtype)])  # (2·rows, d)
        both = _logits(stacked, pred_head, compute)  # (2·rows, V)
        target = both[rows:] if bias is None else both[rows:].add_(bias)
        return both[:rows], target, both
    pred = None if pred_rows is None else _logits(pred_rows, pred_head, compute)
    target = None if target_rows is None else _logits(target_rows, target_head, compute, bias)
    return pred, target, None


def _row_blocks(rows: int, block: int) -> list[slice]:
    return [slice(start, min(rows, start + block)) for start in range(0, rows, block)]


def _vocab_slices(vocab: int) -> list[slice]:
    """The `LOGIT_SLICES` vocabulary slices a 16-bit product is formed in (see `_logits`)."""
    return _row_blocks(vocab, -(-vocab // LOGIT_SLICES))


def _put(dest: torch.Tensor, value: torch.Tensor) -> None:
    """Write a block result into its place in a chunk buffer, unless it was computed there in place."""
    if value.data_ptr() != dest.data_ptr() or value.stride() != dest.stride():
        dest.copy_(value)


def add_head_grad_(head_grad: torch.Tensor, g_mm: torch.Tensor, hidden: torch.Tensor) -> None:
    """head_grad (V, d) += g_mmᵀ·hidden for a chunk's logit gradients g_mm (rows, V) and hidden rows (rows, d), both
    in the matmul dtype: in place when that is the gradient's dtype; a 16-bit product (autocast) into an fp32 head
    gradient vocabulary slice by slice (whole, the (V, d) 16-bit product and its fp32 promotion were 1.5 head
    gradients more at the peak)."""
    if head_grad.dtype == g_mm.dtype:
        head_grad.addmm_(g_mm.t(), hidden)  # Σ_rows g_iᵀ h_i into the one (V, d) buffer
        return
    for cols in _vocab_slices(head_grad.shape[0]):
        head_grad[cols].add_(torch.mm(g_mm[:, cols].t(), hidden))


def add_chunk_grads_(g_mm: torch.Tensor, head: torch.Tensor, hidden: torch.Tensor, rows: slice,
                     grad_hidden: torch.Tensor | None, grad_head: torch.Tensor | None) -> None:
    """From a chunk's logit gradients g_mm (rows, V) in the head's matmul dtype: grad_hidden[rows] = g·W and
    grad_head[:V] += gᵀ·hidden[rows] (`add_head_grad_`); either output may be None."""
    if grad_hidden is not None:
        grad_hidden[rows] = torch.mm(g_mm, head).to(grad_hidden.dtype)
    if grad_head is not None:
        add_head_grad_(grad_head[: head.shape[0]], g_mm, hidden[rows].to(head.dtype))


GradSink = Callable[[str, torch.Tensor], None]


def _statistics_(log_probs_1: torch.Tensor | None, z: torch.Tensor | None, prefix: str, stats: frozenset[str],
                 out: dict[str, torch.Tensor]) -> None:
    """τ = 1 statistics of one side into `out`, from its τ = 1 log-probabilities when formed, else from logits."""
    if f"{prefix}_entropy" in stats:
        out[f"{prefix}_entropy"] = entropy_rows(log_probs_1)
    want_peak, want_argmax = f"{prefix}_peak" in stats, f"{prefix}_argmax" in stats
    if want_peak or want_argmax:
        if log_probs_1 is not None:  # the largest log-probability is the log of the peak probability
            top, arg = log_probs_1.max(-1)
            top = top.exp()
        else:
            top, arg = z.max(-1)
            top = (top - torch.logsumexp(z, -1)).exp()
        if want_peak:
            out[f"{prefix}_peak"] = top
        if want_argmax:
            out[f"{prefix}_argmax"] = arg


def _cross_entropy_(log_probs: torch.Tensor, labels: torch.Tensor, tau_ce: float, name: str, consume: bool,
                    out: dict[str, torch.Tensor], sink: GradSink | None) -> None:
    """CE value of one side into `out`; with a `sink`, also its logit gradient (softmax − one-hot)/τ_ce."""
    out[name] = cross_entropy_rows(log_probs, labels)
    if sink is not None:
        sink(name, cross_entropy_grad_(log_probs if consume else log_probs.clone(), labels).div_(tau_ce))


def _side_forward(z: torch.Tensor, prefix: str, labels: torch.Tensor | None, tau: float | None, plan: _Plan,
                  out: dict[str, torch.Tensor], ce_sink: GradSink | None) -> torch.Tensor | None:
    """Statistics and CE of one side's block of logits `z`; returns log softmax(z/τ), formed in place in `z`,
    when τ is given.

    Everything that needs the raw logits runs first; τ = 1 statistics (and a CE at τ_ce = τ) then read the τ
    log-probabilities instead of forming their own.
    """
    stats, tau_ce = plan.stats, plan.ce_temperature
    want_ce = labels is not None
    share = tau == 1.0  # statistics read the divergence's log-probabilities
    ce_after = want_ce and tau is not None and tau_ce == tau
    log_1 = None
    ce_at_1 = want_ce and not ce_after and tau_ce == 1.0  # a CE that needs τ = 1 log-probabilities anyway
    if not share and f"{prefix}_entropy" in stats and not ce_at_1:
        # entropy (and peak) straight from the logits: on CPU a numba pass with no (rows, V) temporary
        # (`ops.row_stats`), on CUDA one Triton launch, elsewhere the log-softmax, exp and row dot product below
        entropy, peak = row_entropy_peak(z, None, plan.vocab)
        out[f"{prefix}_entropy"] = entropy.to(z.device, z.dtype)
        if f"{prefix}_peak" in stats:
            out[f"{prefix}_peak"] = peak.to(z.device, z.dtype)
        stats = stats - {f"{prefix}_entropy", f"{prefix}_peak"}
    elif not share and (f"{prefix}_entropy" in stats or ce_at_1):
        log_1 = log_probs(z, 1.0)
    if not share:
        _statistics_(log_1, z, prefix, stats, out)
    if want_ce and not ce_after:
        log_ce = log_1 if tau_ce == 1.0 else log_probs(z, tau_ce)
        log_1 = None
        _cross_entropy_(log_ce, labels, tau_ce, f"{prefix}_ce", True, out, ce_sink)
        del log_ce
    del log_1
    if tau is None:
        return None
    log_tau = log_softmax_(z, tau)
    if share:
        _statistics_(log_tau, None, prefix, stats, out)
    if ce_after:
        _cross_entropy_(log_tau, labels, tau_ce, f"{prefix}_ce", False, out, ce_sink)
    return log_tau


def _block_forward(s: torch.Tensor, t: torch.Tensor | None, pred_labels: torch.Tensor | None,
                   target_labels: torch.Tensor | None, plan: _Plan, grads_for: frozenset[str],
                   sink: GradSink) -> dict[str, torch.Tensor]:
    """Per-row values of one block of rows (logits `s`, `t` are views into the chunk and are overwritten: the
    divergence's logit gradient ends up in place of `s` for fkl). In store mode each logit gradient named in
    `grads_for` goes to `sink`."""
    values: dict[str, torch.Tensor] = {}
    spec = plan.divergence
    tau = spec.temperature if spec is not None else None
    log_q = _side_forward(s, "pred", pred_labels, tau, plan, values, sink if "pred_ce" in grads_for else None)
    log_p = None
    if t is not None:
        log_p = _side_forward(t, "target", target_labels, tau, plan, values,
                              sink if "target_ce" in grads_for else None)
    if spec is not None:
        value, grad = divergence_value_and_grad(log_q, log_p, spec, True, "divergence" in grads_for)
        values["divergence"] = value
        if grad is not None:
            sink("divergence", grad.div_(spec.temperature))
    return values


class _FusedHeadKD(torch.autograd.Function):
    """Chunked head matmul + per-row divergence/CE/statistics; see the module docstring for the two backwards."""

    @staticmethod
    def forward(ctx, pred_hidden, pred_weight, target_hidden, target_weight, target_bias,  # type: ignore[override]
                pred_labels, target_labels, plan: _Plan):
        ctx.set_materialize_grads(False)
        rows, device, compute = pred_hidden.shape[0], pred_hidden.device, plan.compute
        pred_needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        target_needs = ctx.needs_input_grad[2] and target_labels is not None
        grads_for: set[str] = set()
        if plan.store:  # outputs whose hidden-state gradients are formed now
            if pred_needs and plan.divergence is not None:
                grads_for.add("divergence")
            if pred_needs and pred_labels is not None:
                grads_for.add("pred_ce")
            if target_needs:
                grads_for.add("target_ce")
        wanted = {"divergence": plan.divergence is not None, "pred_ce": pred_labels is not None,
                  "target_ce": target_labels is not None, **{name: name in plan.stats for name in STATISTICS}}
        outputs = {name: torch.empty(rows if want else 0, device=device,
                                     dtype=torch.int64 if name.endswith("argmax") else compute)
                   for name, want in wanted.items()}  # each (rows,) or empty
        hidden_grads = {name: torch.empty(rows, (target_hidden if name == "target_ce" else pred_hidden).shape[1],
                                          device=device, dtype=compute)
                        for name in sorted(grads_for)}  # (rows, hidden): ∂output_i/∂hidden_i

        with _no_autocast(pred_hidden), torch.no_grad():
            pred_head = _head_rows(pred_weight, plan.vocab, plan.pred_mm)  # (V, d_p)
            target_head = None
            if target_hidden is not None:
                same = _same_tensor(pred_weight, target_weight) and plan.target_mm == plan.pred_mm
                target_head = pred_head if same else _head_rows(target_weight, plan.vocab, plan.target_mm)
            bias = None if target_bias is None else target_bias[: plan.vocab].to(compute)
            for chunk in _row_blocks(rows, plan.chunk):
                # every name holding this chunk's logits is dropped at the end of the iteration: `both` (their
                # storage), the block sink (its default argument holds the gradient buffers, i.e. s) and the loop
                # variable `grad` (a view of s); one left bound kept the chunk alive while the next one was formed
                # (two chunks at the op's peak: 512 instead of 256 MiB in DSKD's teacher space on the tiny recipe)
                s, t, both = _chunk_logits(pred_hidden[chunk], None if target_head is None else target_hidden[chunk],
                                           pred_head, target_head, compute, bias)
                # logit gradients of the whole chunk (store mode): the divergence's where `s` was
                grad_bufs = {name: s if name == "divergence" else torch.empty_like(s) for name in grads_for}
                for block in _row_blocks(s.shape[0], plan.block):
                    def sink(name: str, grad: torch.Tensor, block=block, bufs=grad_bufs) -> None:
                        _put(bufs[name][block], grad)

                    values = _block_forward(
                        s[block], None if t is None else t[block],
                        None if pred_labels is None else pred_labels[chunk][block],
                        None if target_labels is None else target_labels[chunk][block], plan,
                        frozenset(grads_for), sink,
                    )
                    for name, value in values.items():
                        outputs[name][chunk][block] = value
                del t
                for name, grad in grad_bufs.items():  # one matmul per output over the whole chunk
                    head = target_head if name == "target_ce" else pred_head
                    hidden_grads[name][chunk] = torch.mm(grad.to(head.dtype), head).to(compute)
                del s, both, grad_bufs
                grad = sink = None

        ctx.plan = plan
        if plan.store:
            ctx.hidden_grad_names = tuple(hidden_grads)
            ctx.save_for_backward(*hidden_grads.values())
        else:
            ctx.save_for_backward(pred_hidden, pred_weight, target_hidden, target_weight, target_bias,
                                  pred_labels, target_labels)
        ordered = tuple(outputs[name] for name in _OUTPUTS)
        ctx.mark_non_differentiable(*[out for name, out in zip(_OUTPUTS, ordered, strict=True)
                                      if not wanted[name] or name in STATISTICS])
        return ordered

    @staticmethod
    def backward(ctx, *grad_outputs):  # type: ignore[override]
        plan: _Plan = ctx.plan
        a_div, a_pce, a_tce = grad_outputs[:3]  # (rows,) or None when the output was not used
        if plan.store:
            saved = dict(zip(ctx.hidden_grad_names, ctx.saved_tensors, strict=True))
            return (*_combine_stored(saved, a_div, a_pce, a_tce), None, None, None, None, None, None)
        return _recompute_backward(ctx, a_div, a_pce, a_tce)


def _combine_stored(saved: dict[str, torch.Tensor], a_div, a_pce, a_tce) -> tuple:
    """(grad pred_hidden, None, grad target_hidden) as Σ_outputs a_i · (∂out_i/∂hidden_i) from forward."""
    grad_pred = grad_target = None
    for name, weight in (("divergence", a_div), ("pred_ce", a_pce)):
        if weight is not None and name in saved:
            term = saved[name] * weight.to(saved[name].dtype).unsqueeze(-1)
            grad_pred = term if grad_pred is None else grad_pred.add_(term)
    if a_tce is not None and "target_ce" in saved:
        grad_target = saved["target_ce"] * a_tce.to(saved["target_ce"].dtype).unsqueeze(-1)
    return grad_pred, None, grad_target


def _block_grads(s: torch.Tensor | None, t: torch.Tensor | None, plan: _Plan, pred_labels, target_labels,
                 a_div, a_pce, a_tce) -> None:
    """Logit gradients of one block, weighted by the output gradients, written in place: Σ over the prediction's
    outputs into `s`, the target CE's into `t` (both are views into the chunk's logits and are overwritten)."""
    spec, compute, tau_ce = plan.divergence, plan.compute, plan.ce_temperature
    g_t = None
    if a_tce is not None:  # from the raw target logits, before the divergence turns them into log-probabilities
        g_t = cross_entropy_grad_(log_probs(t, tau_ce), target_labels)
        g_t.mul_((a_tce.to(compute) / tau_ce).unsqueeze(-1))
    g = None
    if a_pce is not None:
        g = cross_entropy_grad_(log_probs(s, tau_ce), pred_labels)
        g.mul_((a_pce.to(compute) / tau_ce).unsqueeze(-1))
    if a_div is not None:
        log_q, log_p = log_softmax_(s, spec.temperature), log_softmax_(t, spec.temperature)
        _, g_div = divergence_value_and_grad(log_q, log_p, spec, False, True)
        g_div.mul_((a_div.to(compute) / spec.temperature).unsqueeze(-1))
        g = g_div if g is None else g.add_(g_div)
    if g is not None:
        _put(s, g)
    if g_t is not None:
        _put(t, g_t)


def _recompute_backward(ctx, a_div, a_pce, a_tce) -> tuple:
    """Recompute each chunk's logits, form the logit gradients weighted by the output gradients block by block,
    and reduce them with one matmul per chunk into the hidden-state gradients and, in place, the head gradient."""
    plan: _Plan = ctx.plan
    pred_hidden, pred_weight, target_hidden, target_weight, target_bias, pred_labels, target_labels = ctx.saved_tensors
    need_ph, need_pw, need_th = ctx.needs_input_grad[:3]
    spec, compute = plan.divergence, plan.compute
    a_div = a_div if a_div is not None and spec is not None and (need_ph or need_pw) else None
    a_pce = a_pce if a_pce is not None and pred_labels is not None and (need_ph or need_pw) else None
    a_tce = a_tce if a_tce is not None and target_labels is not None and need_th else None
    grad_ph = torch.zeros_like(pred_hidden) if need_ph else None
    grad_pw = torch.zeros_like(pred_weight) if need_pw else None  # the full head: padding rows stay 0
    grad_th = torch.zeros_like(target_hidden) if need_th else None
    rows = pred_hidden.shape[0]
    pred_active, target_needed = a_div is not None or a_pce is not None, a_div is not None or a_tce is not None
    if not (pred_active or a_tce is not None) or rows == 0:
        return grad_ph, grad_pw, grad_th, None, None, None, None, None
    with _no_autocast(pred_hidden), torch.no_grad():
        pred_head = _head_rows(pred_weight, plan.vocab, plan.pred_mm)
        target_head = None
        if target_needed:
            same = _same_tensor(pred_weight, target_weight) and plan.target_mm == plan.pred_mm
            target_head = pred_head if same else _head_rows(target_weight, plan.vocab, plan.target_mm)
        bias = None if target_bias is None else target_bias[: plan.vocab].to(compute)
        head_grad = grad_pw[: plan.vocab] if grad_pw is not None else None  # (V, d_p) view

        def part(x, chunk, block):
            return None if x is None else x[chunk][block]

        for chunk in _row_blocks(rows, plan.chunk):
            s, t, both = _chunk_logits(pred_hidden[chunk] if pred_active else None,
                                       target_hidden[chunk] if target_needed else None,
                                       pred_head, target_head, compute, bias)
            for block in _row_blocks((s if s is not None else t).shape[0], plan.block):
                _block_grads(part(s, slice(None), block), part(t, slice(None), block), plan,
                             part(pred_labels, chunk, block), part(target_labels, chunk, block),
                             part(a_div, chunk, block), part(a_pce, chunk, block), part(a_tce, chunk, block))
            # s now holds the prediction logits' gradient, t the target CE's: one matmul each over the chunk,
            # or one for both when they share the head and both are live
            if both is not None and pred_active and a_tce is not None and grad_ph is not None:
                hidden = torch.mm(both.to(pred_head.dtype), pred_head)  # (2·rows, d)
                grad_ph[chunk] = hidden[: s.shape[0]].to(grad_ph.dtype)
                grad_th[chunk] = hidden[s.shape[0]:].to(grad_th.dtype)
                done_th = True
            else:
                if pred_active and grad_ph is not None:
                    grad_ph[chunk] = torch.mm(s.to(pred_head.dtype), pred_head).to(grad_ph.dtype)
                done_th = False
            if a_tce is not None and not done_th:
                grad_th[chunk] = torch.mm(t.to(target_head.dtype), target_head).to(grad_th.dtype)
            if pred_active and head_grad is not None:
                g_mm = s.to(pred_head.dtype)
                add_head_grad_(head_grad, g_mm, pred_hidden[chunk].to(pred_head.dtype))
                del g_mm
            del s, t, both
    return grad_ph, grad_pw, grad_th, None, None, None, None, None


def _check_rows(name: str, x: torch.Tensor | None, rows: int, dim: int | None = None) -> None:
    if x is None:
        return
    if dim is None and x.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) (one entry per row), got {tuple(x.shape)}")
    if dim is not None and (x.dim() != 2 or x.shape[0] != rows):
        raise ValueError(f"{name} must be (rows={rows}, hidden), got {tuple(x.shape)}")


def fused_head_kd(
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
    chunk_elements: int = CHUNK_ELEMENTS,
    block_elements: int = BLOCK_ELEMENTS,
    backward: str = "auto",
) -> FusedKDRows:
    """Per-row D(softmax(t/τ) → softmax(s/τ)), CEs and τ = 1 statistics for s = h_p·W_pᵀ, t = h_t·W_tᵀ (+ bias).

    pred_hidden (rows, d_p), pred_weight (H_p ≥ vocab_size, d_p); target_hidden (rows, d_t), target_weight
    (H_t ≥ vocab_size, d_t), row i of one side paired with row i of the other; only the first `vocab_size` head
    rows are used. `divergence`: fkl | rkl | sfkl | srkl | js | akl, or None for CE/statistics only (then the
    target side may be omitted). `pred_labels` / `target_labels` (rows,) int64, −100 = ignored: each turns on the
    cross-entropy of that side at `ce_temperature`, −log softmax(z/τ_ce)(y). `statistics`: names from
    `STATISTICS`. `backward`: auto | store | recompute (see the module docstring; auto stores when `pred_weight`
    takes no gradient). No τ² factor.
    """
    rows = pred_hidden.shape[0] if pred_hidden.dim() == 2 else -1
    _check_rows("pred_hidden", pred_hidden, rows, dim=2)
    if pred_weight.dim() != 2 or pred_weight.shape[1] != pred_hidden.shape[1]:
        raise ValueError(f"pred_weight must be (head rows, {pred_hidden.shape[1]}), got {tuple(pred_weight.shape)}")
    if not 1 <= vocab_size <= pred_weight.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {pred_weight.shape[0]}] (the head's rows), got {vocab_size}")
    if (target_hidden is None) != (target_weight is None):
        raise ValueError("pass target_hidden and target_weight together (or neither)")
    if target_hidden is not None:
        _check_rows("target_hidden", target_hidden, rows, dim=2)
        if target_weight.dim() != 2 or target_weight.shape[1] != target_hidden.shape[1]:
            raise ValueError(f"target_weight must be (head rows, {target_hidden.shape[1]}), "
                             f"got {tuple(target_weight.shape)}")
        if target_weight.shape[0] < vocab_size:
            raise ValueError(f"target_weight has {target_weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
        if torch.is_grad_enabled() and (target_weight.requires_grad or
                                        (target_bias is not None and target_bias.requires_grad)):
            raise ValueError("the target head is fixed here: pass target_weight.detach() (and a detached bias)")
    if target_bias is not None and (target_hidden is None or target_bias.dim() != 1
                                    or target_bias.shape[0] < vocab_size):
        raise ValueError(f"target_bias must be (≥ {vocab_size},) and needs a target side")
    if divergence is not None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)} or None")
        if target_hidden is None:
            raise ValueError("a divergence needs the target side (target_hidden, target_weight)")
    if not temperature > 0 or not ce_temperature > 0:
        raise ValueError(f"temperatures must be > 0, got {temperature} and {ce_temperature}")
    if not 0.0 <= skew_lambda < 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1), got {skew_lambda}")
    _check_rows("pred_labels", pred_labels, rows)
    _check_rows("target_labels", target_labels, rows)
    if target_labels is not None and target_hidden is None:
        raise ValueError("target_labels need the target side")
    stats = frozenset(statistics)
    unknown = sorted(stats - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {STATISTICS}")
    if target_hidden is None and any(name.startswith("target_") for name in stats):
        raise ValueError("target statistics need the target side")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    weight_grad = torch.is_grad_enabled() and pred_weight.requires_grad
    if backward == "store" and weight_grad:
        raise ValueError("backward='store' cannot give pred_weight a gradient; use 'recompute' or 'auto'")
    store = backward == "store" or (backward == "auto" and not weight_grad)

    pred_mm = matmul_dtype(pred_weight)
    target_mm = None if target_weight is None else matmul_dtype(target_weight)
    compute = torch.promote_types(torch.promote_types(pred_mm, target_mm or pred_mm), torch.float32)
    spec = None if divergence is None else DivergenceSpec(divergence, float(temperature), float(skew_lambda),
                                                          float(akl_alpha))
    chunk = max(1, chunk_elements // vocab_size)
    block = min(chunk, max(1, block_elements // vocab_size))
    plan = _Plan(spec, int(vocab_size), float(ce_temperature), stats, chunk, block, store, pred_mm, target_mm, compute)
    outs = _FusedHeadKD.apply(pred_hidden, pred_weight, target_hidden, target_weight, target_bias,
                              pred_labels, target_labels, plan)
    named = dict(zip(_OUTPUTS, outs, strict=True))
    return FusedKDRows(**{
        name: value if (name in stats or (name == "divergence" and spec is not None)
                        or (name == "pred_ce" and pred_labels is not None)
                        or (name == "target_ce" and target_labels is not None)) else None
        for name, value in named.items()
    })
