"""Sequence-level term of DWA-KD: Soft-DTW divergence between the *response* trajectories of both sides.

docs/methods.md#52-sequence-level-soft-dtw.

Each sequence's valid label positions are gathered to the front (prompt and padding dropped), and the per-sample
lengths go to `dwakd.ops.soft_dtw.soft_dtw_divergence` with cosine costs, the band (if any) on the cross term only.
Choices where the paper is silent (docs/methods.md#56-choices-and-departures):
- a sequence with no valid position on either side contributes 0;
- costs and Soft-DTW run in fp32 with autocast off (float64 inputs stay float64).
"""

from __future__ import annotations

import torch

from dwakd.modules.band import attention_band
from dwakd.modules.divergences import compute_dtype
from dwakd.ops.soft_dtw import soft_dtw_divergence


def front_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, length) indices that put valid positions first, in their original order, and (batch,) lengths."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (batch, length)
    return order, mask.sum(-1)


def compact(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each row's valid positions of x (batch, length, ...) to the front: (batch, L, ...), lengths (batch,).

    L = max(1, longest row); entries past a row's length are zero. Differentiable w.r.t. x.
    """
    order, lengths = front_order(mask)
    width = max(1, int(lengths.max())) if lengths.numel() else 1
    order = order[:, :width]  # (batch, L)
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    out = x.gather(1, index)  # (batch, L, ...)
    keep = torch.arange(width, device=x.device).view(1, width) < lengths.view(-1, 1)  # (batch, L)
    out = out * keep.view(*keep.shape, *([1] * (x.dim() - 2))).to(out.dtype)
    return out, lengths


def compact_pairs(pairs: torch.Tensor, mask_rows: torch.Tensor, mask_cols: torch.Tensor) -> torch.Tensor:
    """Compact a (batch, n, m) matrix over valid rows and valid columns: (batch, L_n, L_m), zeros past lengths."""
    rows, _ = compact(pairs, mask_rows)  # (batch, L_n, m)
    cols, _ = compact(rows.transpose(1, 2), mask_cols)  # (batch, L_m, L_n)
    return cols.transpose(1, 2)


def response_dtw_divergence(
    student_seq: torch.Tensor,
    teacher_seq: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    gamma: float,
    attention: torch.Tensor | None = None,
    band_base: float = 5.0,
    band_sensitivity: float = 2.0,
    band_blend: float = 0.7,
    band_penalty: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-sequence Soft-DTW divergence (batch,) over response positions; banded when `attention` (b, n, m) is given.

    student_seq (batch, n, D) and teacher_seq (batch, m, D) share the feature width D (the teacher side already
    projected into student space); masks are the label masks m_s / m_t of the padded grids.
    """
    with torch.autocast(device_type=student_seq.device.type, enabled=False):
        dtype = torch.promote_types(compute_dtype(student_seq), teacher_seq.dtype)  # fp32, float64 stays
        x, len_x = compact(student_seq.to(dtype), student_mask)  # (batch, N, D)
        y, len_y = compact(teacher_seq.to(dtype), teacher_mask)  # (batch, M, D)
        out = torch.zeros(x.shape[0], dtype=dtype, device=x.device)  # (batch,)
        keep = ((len_x > 0) & (len_y > 0)).nonzero().squeeze(1)
        if keep.numel() == 0:
            return out + 0.0 * (student_seq.sum() + teacher_seq.sum()).to(dtype)  # keep the graph connected
        band = None
        if attention is not None:
            attn = compact_pairs(attention.detach(), student_mask, teacher_mask)  # (batch, N, M)
            band = attention_band(
                attn[keep], len_x[keep], len_y[keep], band_base, band_sensitivity, band_blend, band_penalty
            )
        values = soft_dtw_divergence(x[keep], y[keep], gamma, len_x[keep], len_y[keep], band=band, impl=impl)
        return out.index_put((keep,), values)
