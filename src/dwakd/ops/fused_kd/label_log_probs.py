"""ALM's per-row log p(label) and space log-mass, on label-row logits or fused with the LM head.

Per row with logits z over the real vocabulary V, label y and a space set S ⊂ V (`dwakd.methods.alm`):
label_lp = z_y − lse(z) and space_lp = lse(z_S) − lse(z) = log Σ_{v∈S} softmax(z)_v. With incoming gradients
g_label, g_space: ∂/∂z = g_label·(onehot(y) − p) + g_space·(q − p), p = softmax(z), q = the softmax restricted to S.

- `label_lse_rows` and `label_logit_grad_` are that math on one chunk of logits, shared by both ops below.
- `label_log_probs` takes label-row logits (rows, ≥ V) already formed (`ModelView.label_logits`); its backward
  recomputes the softmax from the saved logits, so no (rows, V) probabilities are kept between the passes.
- `fused_head_label_log_probs` takes hidden rows and the head weight instead: forward forms the logits h·Wᵀ a chunk
  of rows at a time and keeps only its inputs and per-row lse / space lse; backward recomputes each chunk's logits,
  forms ∂/∂z and turns it into the hidden rows' and the head's gradients (the outputs are per row, so their
  gradients are only known in backward). Alive at a time: one chunk's logits and one same-sized temporary (the
  space-masked logits, or q); no (rows × V) tensor for all rows.

Both return fp32 values (float64 stays float64). The plain references are
`dwakd.ops.fused_kd.reference.label_log_probs_reference` and `head_label_log_probs_reference` (autograd).
"""

from __future__ import annotations

import math

import torch

from dwakd.ops.autocast import matmul_dtype
from dwakd.ops.fused_kd.functional import _head_rows, _logits, _no_autocast, _row_blocks, add_chunk_grads_
from dwakd.ops.row_math import compute_dtype

DENSE_CHUNK_ELEMENTS = 1 << 24  # fp32 (rows × vocab) elements per chunk of `label_log_probs` (64 MiB)
CHUNK_ELEMENTS = 1 << 25  # logits per chunk of the fused op: 128 MiB in fp32, as `fused_head_kd`


def label_lse_rows(z: torch.Tensor, labels: torch.Tensor, space_mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, label_lp, space_lse) per row of a chunk of logits z (rows, V) in the compute dtype; space_lse is None
    without `space_mask`. z is only read."""
    lse = torch.logsumexp(z, -1)
    label_lp = z.gather(1, labels[:, None]).squeeze(1) - lse
    space_lse = None if space_mask is None else torch.logsumexp(z.masked_fill(~space_mask, -math.inf), -1)
    return lse, label_lp, space_lse


def label_logit_grad_(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g_label: torch.Tensor,
                      space_mask: torch.Tensor | None, space_lse: torch.Tensor | None,
                      g_space: torch.Tensor | None) -> torch.Tensor:
    """∂/∂z = g_label·(onehot − p) + g_space·(q − p) for a chunk of logits z (rows, V), formed in z's storage
    (z is consumed); the space term is skipped when `g_space` is None."""
    q = None
    if g_space is not None:
        q = (z - space_lse[:, None]).exp_().masked_fill_(~space_mask, 0.0).mul_(g_space[:, None])
    total = g_label if g_space is None else g_label + g_space
    g = z.sub_(lse[:, None]).exp_().mul_(-total[:, None])  # −(g_label + g_space)·p
    g.scatter_add_(1, labels[:, None], g_label[:, None])
    return g if q is None else g.add_(q)


def _incoming(grad_label: torch.Tensor | None, grad_space: torch.Tensor | None, lse: torch.Tensor,
              space_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The outputs' incoming gradients in the compute dtype: g_label (zeros when None), g_space (None when there is
    no space set or no gradient, which skips the space term)."""
    g_label = torch.zeros_like(lse) if grad_label is None else grad_label.to(lse.dtype)
    g_space = None if grad_space is None or space_mask is None else grad_space.to(lse.dtype)
    return g_label, g_space


def _outputs(label_lp: torch.Tensor, lse: torch.Tensor, space_lse: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(label_lp, space_lp), space_lp zeros without a space set."""
    return label_lp, (space_lse - lse if space_lse is not None else torch.zeros_like(label_lp))


class _LabelLogProbs(torch.autograd.Function):
    """label_lp and space_lp of label-row logits in row chunks; backward recomputes each chunk's softmax from the
    saved logits (nothing of size (rows, vocab) is kept between the passes)."""

    @staticmethod
    def forward(ctx, logits, labels, vocab, space_mask, chunk):  # type: ignore[override]
        dtype = compute_dtype(logits)
        rows = logits.shape[0]
        lse = torch.empty(rows, dtype=dtype, device=logits.device)
        label_lp = torch.empty_like(lse)
        space_lse = torch.empty_like(lse) if space_mask is not None else None
        with _no_autocast(logits):
            for part in _row_blocks(rows, chunk):
                lse[part], label_lp[part], s = label_lse_rows(logits[part, :vocab].to(dtype), labels[part],
                                                              space_mask)
                if s is not None:
                    space_lse[part] = s
        ctx.save_for_backward(logits, labels, space_mask, lse, space_lse)
        ctx.vocab, ctx.chunk = vocab, chunk
        return _outputs(label_lp, lse, space_lse)

    @staticmethod
    def backward(ctx, grad_label, grad_space):  # type: ignore[override]
        logits, labels, space_mask, lse, space_lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad = torch.zeros_like(logits)  # (rows, R): head padding columns get no gradient
        g_label, g_space = _incoming(grad_label, grad_space, lse, space_mask)
        with _no_autocast(logits):
            for part in _row_blocks(logits.shape[0], ctx.chunk):
                z = logits[part, : ctx.vocab].to(lse.dtype, copy=True)  # consumed below
                grad[part, : ctx.vocab] = label_logit_grad_(
                    z, labels[part], lse[part], g_label[part], space_mask,
                    None if g_space is None else space_lse[part], None if g_space is None else g_space[part])
        return grad, None, None, None, None


def _check_labels_and_mask(labels: torch.Tensor, rows: int, vocab: int, space_mask: torch.Tensor | None) -> None:
    if labels.shape != (rows,):
        raise ValueError(f"labels must be ({rows},) (one per row), got {tuple(labels.shape)}")
    if space_mask is not None and (space_mask.shape != (vocab,) or space_mask.dtype != torch.bool):
        raise ValueError(f"space_mask must be a ({vocab},) bool mask over the vocabulary, got "
                         f"{tuple(space_mask.shape)} {space_mask.dtype}")


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor, vocab: int, space_mask: torch.Tensor | None = None,
                    chunk_elements: int = DENSE_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows,) log p(label) and (rows,) log P(next token ∈ space set) (zeros without `space_mask`), at least fp32.

    `logits` (rows, R ≥ vocab) are label-row logits (`ModelView.label_logits`); head rows ≥ vocab are ignored.
    """
    _check_labels_and_mask(labels, logits.shape[0], vocab, space_mask)
    chunk = max(1, chunk_elements // max(1, vocab))
    return _LabelLogProbs.apply(logits, labels, vocab, space_mask, chunk)


class _FusedHeadLabelLogProbs(torch.autograd.Function):
    """label_lp and space_lp of h·Wᵀ: per-row lse (and space lse) in one chunked forward pass; backward recomputes
    each chunk's logits in the forward's matmul dtype (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, space_mask, vocab, chunk):  # type: ignore[override]
        mm = matmul_dtype(weight)
        compute = torch.promote_types(mm, torch.float32)
        rows = hidden.shape[0]
        lse = torch.empty(rows, dtype=compute, device=hidden.device)
        label_lp = torch.empty_like(lse)
        space_lse = torch.empty_like(lse) if space_mask is not None else None
        with _no_autocast(hidden), torch.no_grad():
            head = _head_rows(weight, vocab, mm)
            for part in _row_blocks(rows, chunk):
                lse[part], label_lp[part], s = label_lse_rows(_logits(hidden[part], head, compute), labels[part],
                                                              space_mask)
                if s is not None:
                    space_lse[part] = s
        ctx.save_for_backward(hidden, weight, labels, space_mask, lse, space_lse)
        ctx.vocab, ctx.chunk, ctx.mm = vocab, chunk, mm  # backward may run outside the forward's autocast
        return _outputs(label_lp, lse, space_lse)

    @staticmethod
    def backward(ctx, grad_label, grad_space):  # type: ignore[override]
        hidden, weight, labels, space_mask, lse, space_lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None  # the full head: padding rows stay 0
        if not (want_h or want_w):
            return None, None, None, None, None, None
        g_label, g_space = _incoming(grad_label, grad_space, lse, space_mask)
        with _no_autocast(hidden), torch.no_grad():
            head = _head_rows(weight, ctx.vocab, ctx.mm)
            for part in _row_blocks(hidden.shape[0], ctx.chunk):
                g = label_logit_grad_(_logits(hidden[part], head, lse.dtype), labels[part], lse[part],
                                      g_label[part], space_mask, None if g_space is None else space_lse[part],
                                      None if g_space is None else g_space[part])
                g_mm = g.to(head.dtype)
                del g
                add_chunk_grads_(g_mm, head, hidden, part, grad_h, grad_w)
                del g_mm
        return grad_h, grad_w, None, None, None, None


def fused_head_label_log_probs(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, labels: torch.Tensor,
                               space_mask: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`label_log_probs` of the logits h·Wᵀ without forming them for all rows: (rows,) log p(label) and (rows,)
    log P(next token ∈ space set) (zeros without `space_mask`), differentiable w.r.t. `hidden` (rows, d) and
    `weight` (H ≥ vocab, d; only its first `vocab` rows enter, the others get zero gradient).

    The matmul runs as `F.linear` would (autocast's dtype when on, else the head's; the hidden is cast to it), the
    rest in fp32 (float64 stays float64).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (rows, d) and weight (head rows, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not 1 <= vocab <= weight.shape[0]:
        raise ValueError(f"vocab must be in [1, {weight.shape[0]}] (the head's rows), got {vocab}")
    _check_labels_and_mask(labels, hidden.shape[0], vocab, space_mask)
    return _FusedHeadLabelLogProbs.apply(hidden, weight, labels, space_mask, int(vocab),
                                         max(1, chunk_elements // vocab))
