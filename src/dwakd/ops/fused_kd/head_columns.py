"""CDM's LM-head terms from hidden rows and head weights, chunk by chunk: no (rows × V) logits for all rows.

CDM (`dwakd.methods.cdm`) reads of each side's logits z = h·Wᵀ only per-row entropies, the top-k columns of pooled
rows and a few gathered columns of those pooled rows; pooling is linear, so pooled logits are (P·h)·Wᵀ. Three ops:
- `head_entropy`: entropy of softmax(z) per row (no gradient), a forward pass over row chunks of h·Wᵀ;
- `head_topk`: indices of the k largest logits per row (no gradient), the same chunked pass keeping (rows, k);
- `gathered_head_logits`: z[g, c] = ⟨h_g, W[cols[g, c]]⟩ for (rows, C) given columns, differentiable w.r.t. h and
  W; forward gathers the head rows of a chunk of rows at a time (no (rows, C, d) tensor for all rows), backward
  recomputes that gather: dL/dh_g = Σ_c G[g, c]·W[cols[g, c]], and G[g, c]·h_g is added into the head gradient's
  row cols[g, c] (`index_add_`: repeated columns add up; padding rows, and every column not gathered, get 0). Those
  products are summed per head row over a chunk in the compute dtype first, so a 16-bit head gradient is rounded
  once per row and chunk (as `add_head_grad_` rounds a chunk's product), not once per gathered entry.
Precision as `F.linear`'s: the products run in autocast's dtype when it is on (`matmul_dtype`), else in the head's;
the logits are then promoted to fp32 (float64 stays float64) for the entropy and the output. The plain references
(dense `F.linear` logits, autograd) are `head_entropy_reference`, `head_topk_reference` and
`gathered_head_logits_reference` in `dwakd.ops.fused_kd.reference`.
"""

from __future__ import annotations

import torch

from dwakd.ops.autocast import matmul_dtype
from dwakd.ops.fused_kd.functional import _head_rows, _logits, _no_autocast, _row_blocks

CHUNK_ELEMENTS = 1 << 25  # logits (or gathered head entries) per chunk: 128 MiB in fp32, as `fused_head_kd`


def logit_entropy(z: torch.Tensor) -> torch.Tensor:
    """(rows,) entropy of softmax(z) for a (rows, V) block in its own (≥ fp32) dtype, without gradient.

    With u = z − max z (−∞ clamped to the lowest finite value) and e = exp(u): H = log Σ e − ⟨e, u⟩ / Σ e.
    """
    with torch.no_grad():
        shifted = (z - z.amax(-1, keepdim=True)).clamp_(min=torch.finfo(z.dtype).min)  # (rows, V) ≤ 0
        e = shifted.exp()
        total = e.sum(-1)
        return total.log() - torch.einsum("rv,rv->r", e, shifted) / total


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (rows, d) and weight (head rows, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not 1 <= vocab <= weight.shape[0]:
        raise ValueError(f"vocab must be in [1, {weight.shape[0]}] (the head's rows), got {vocab}")


def _compute_dtypes(weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype as `F.linear` would use it now, dtype of the promoted logits: ≥ fp32)."""
    mm = matmul_dtype(weight)
    return mm, torch.promote_types(mm, torch.float32)


@torch.no_grad()
def head_entropy(hidden: torch.Tensor, weight: torch.Tensor, vocab: int,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(rows,) entropy (nats) of softmax(h·W[:vocab]ᵀ) per row, without gradient, in chunks of
    `chunk_elements // vocab` rows."""
    _check_head(hidden, weight, vocab)
    mm, compute = _compute_dtypes(weight)
    out = torch.empty(hidden.shape[0], dtype=compute, device=hidden.device)
    with _no_autocast(hidden):
        head = _head_rows(weight, vocab, mm)
        for part in _row_blocks(hidden.shape[0], max(1, chunk_elements // vocab)):
            out[part] = logit_entropy(_logits(hidden[part], head, compute))
    return out


@torch.no_grad()
def head_topk(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, k: int,
              chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(rows, min(k, vocab)) int64 indices of the largest logits of h·W[:vocab]ᵀ per row, in decreasing order (as
    `torch.topk`), without gradient, in chunks of `chunk_elements // vocab` rows."""
    _check_head(hidden, weight, vocab)
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    mm, compute = _compute_dtypes(weight)
    width = min(k, vocab)
    out = torch.empty(hidden.shape[0], width, dtype=torch.long, device=hidden.device)
    with _no_autocast(hidden):
        head = _head_rows(weight, vocab, mm)
        for part in _row_blocks(hidden.shape[0], max(1, chunk_elements // vocab)):
            out[part] = _logits(hidden[part], head, compute).topk(width, dim=-1).indices
    return out


def _gathered_head(weight: torch.Tensor, cols: torch.Tensor, mm: torch.dtype) -> torch.Tensor:
    """(rows, C, d) head rows W[cols] in the matmul dtype."""
    return weight.index_select(0, cols.reshape(-1)).to(mm).view(*cols.shape, weight.shape[1])


class _GatheredHeadLogits(torch.autograd.Function):
    """z[g, c] = ⟨h_g, W[cols[g, c]]⟩ a chunk of rows at a time; backward regathers each chunk's head rows (see the
    module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, cols, chunk):  # type: ignore[override]
        mm, compute = _compute_dtypes(weight)
        out = torch.empty(cols.shape, dtype=compute, device=hidden.device)
        with _no_autocast(hidden), torch.no_grad():
            for part in _row_blocks(cols.shape[0], chunk):
                rows = _gathered_head(weight, cols[part], mm)  # (r, C, d)
                out[part] = torch.bmm(rows, hidden[part].to(mm).unsqueeze(-1)).squeeze(-1).to(compute)
        ctx.save_for_backward(hidden, weight, cols)
        ctx.chunk, ctx.mm, ctx.compute = chunk, mm, compute
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, cols = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None  # the full head: rows never gathered stay 0
        if grad_out is None or not (want_h or want_w):
            return grad_h, grad_w, None, None
        mm, compute = ctx.mm, ctx.compute
        with _no_autocast(hidden), torch.no_grad():
            for part in _row_blocks(cols.shape[0], ctx.chunk):
                g = grad_out[part].to(mm)  # (r, C)
                if want_h:
                    rows = _gathered_head(weight, cols[part], mm)  # (r, C, d)
                    grad_h[part] = torch.bmm(g.unsqueeze(1), rows).squeeze(1).to(grad_h.dtype)
                    del rows
                if want_w:  # G[g, c]·h_g of the matmul-dtype operands, summed per head row in the compute dtype
                    outer = g.to(compute).unsqueeze(-1) * hidden[part].to(mm).to(compute).unsqueeze(1)  # (r, C, d)
                    used, slot = torch.unique(cols[part], return_inverse=True)  # head rows of the chunk, (r, C)
                    sums = outer.new_zeros(used.numel(), weight.shape[1])
                    sums.index_add_(0, slot.reshape(-1), outer.reshape(-1, weight.shape[1]))
                    del outer
                    grad_w.index_add_(0, used, sums.to(grad_w.dtype))  # one rounding per row and chunk (16-bit heads)
                    del sums
        return grad_h, grad_w, None, None


def gathered_head_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, cols: torch.Tensor,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(rows, C) logits (h·W[:vocab]ᵀ)[g, cols[g, c]] in ≥ fp32, differentiable w.r.t. `hidden` and `weight`;
    `cols` (rows, C) int64 in [0, vocab). Chunks of `chunk_elements // (C·d)` rows."""
    _check_head(hidden, weight, vocab)
    if cols.dim() != 2 or cols.shape[0] != hidden.shape[0] or cols.dtype != torch.long:
        raise ValueError(f"cols must be int64 ({hidden.shape[0]}, C), got {cols.dtype} {tuple(cols.shape)}")
    if cols.numel() and not (0 <= int(cols.min()) and int(cols.max()) < vocab):
        raise ValueError(f"cols must lie in [0, {vocab}), got {int(cols.min())}..{int(cols.max())}")
    chunk = max(1, chunk_elements // max(1, cols.shape[1] * hidden.shape[1]))
    return _GatheredHeadLogits.apply(hidden, weight, cols, chunk)
