"""Sequence-level term of DWA-KD: Soft-DTW divergence between the *response* trajectories of both sides.

docs/methods.md#52-sequence-level-soft-dtw.

Each sequence's valid label positions are gathered to the front (prompt and padding dropped), and the per-sample
lengths go to `dwakd.ops.soft_dtw.soft_dtw_divergence` with cosine costs, the band (if any) on the cross term only.
Choices where the paper is silent (docs/methods.md#56-choices-and-departures):
- a sequence with no valid position on either side contributes 0;
- costs and Soft-DTW run in fp32 with autocast off (float64 inputs stay float64).

Host synchronisation: the compacted widths, which sequences to keep and the validated lengths all follow from the
per-sample lengths, so they are read to the host once (`response_lengths`, one transfer for both layers of a step)
instead of once per `int(...)`, `nonzero` and length check (18 device syncs per DWA-KD step on a GPU before, each
draining the queue of launched kernels).
"""

from __future__ import annotations

import torch

from dwakd.modules.band import attention_band
from dwakd.modules.divergences import compute_dtype
from dwakd.ops._transfer import to_device
from dwakd.ops.soft_dtw import soft_dtw_divergence


def front_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, length) indices that put valid positions first, in their original order, and (batch,) lengths."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (batch, length)
    return order, mask.sum(-1)


def compact(x: torch.Tensor, mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each row's valid positions of x (batch, length, ...) to the front: (batch, L, ...), lengths (batch,).

    L = `width` if given (the caller knows the longest row: no device sync here), else max(1, longest row); entries
    past a row's length are zero. Differentiable w.r.t. x.
    """
    order, lengths = front_order(mask)
    if width is None:
        width = max(1, int(lengths.max())) if lengths.numel() else 1
    order = order[:, :width]  # (batch, L)
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    out = x.gather(1, index)  # (batch, L, ...)
    keep = torch.arange(width, device=x.device).view(1, width) < lengths.view(-1, 1)  # (batch, L)
    out = out * keep.view(*keep.shape, *([1] * (x.dim() - 2))).to(out.dtype)
    return out, lengths


def compact_pairs(
    pairs: torch.Tensor, mask_rows: torch.Tensor, mask_cols: torch.Tensor, widths: tuple[int, int] | None = None
) -> torch.Tensor:
    """Compact a (batch, n, m) matrix over valid rows and valid columns: (batch, L_n, L_m), zeros past lengths
    (`widths` = (L_n, L_m) when the caller knows them)."""
    width_rows, width_cols = widths if widths is not None else (None, None)
    rows, _ = compact(pairs, mask_rows, width_rows)  # (batch, L_n, m)
    cols, _ = compact(rows.transpose(1, 2), mask_cols, width_cols)  # (batch, L_m, L_n)
    return cols.transpose(1, 2)


def response_lengths(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per-sample valid lengths of both sides as host lists: one device-to-host transfer."""
    both = torch.stack([student_mask.sum(-1), teacher_mask.sum(-1)]).tolist()  # (2, batch)
    return both[0], both[1]


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
    lengths: tuple[list[int], list[int]] | None = None,
) -> torch.Tensor:
    """Per-sequence Soft-DTW divergence (batch,) over response positions; banded when `attention` (b, n, m) is given.

    student_seq (batch, n, D) and teacher_seq (batch, m, D) share the feature width D (the teacher side already
    projected into student space); masks are the label masks m_s / m_t of the padded grids. `lengths` is
    `response_lengths(student_mask, teacher_mask)` if the caller has it (else it is read here: one device sync).
    """
    host_x, host_y = lengths if lengths is not None else response_lengths(student_mask, teacher_mask)
    widths = (max(1, max(host_x, default=1)), max(1, max(host_y, default=1)))
    kept = [b for b, (n, m) in enumerate(zip(host_x, host_y, strict=True)) if n > 0 and m > 0]
    with torch.autocast(device_type=student_seq.device.type, enabled=False):
        dtype = torch.promote_types(compute_dtype(student_seq), teacher_seq.dtype)  # fp32, float64 stays
        x, len_x = compact(student_seq.to(dtype), student_mask, widths[0])  # (batch, N, D)
        y, len_y = compact(teacher_seq.to(dtype), teacher_mask, widths[1])  # (batch, M, D)
        if not kept:
            return x.new_zeros(x.shape[0]) + 0.0 * (student_seq.sum() + teacher_seq.sum()).to(dtype)  # connected
        everyone = len(kept) == x.shape[0]
        keep = None if everyone else to_device(torch.tensor(kept), x.device)  # no stream sync

        def select(t: torch.Tensor) -> torch.Tensor:
            return t if keep is None else t.index_select(0, keep)

        # validated lengths on the host side of `soft_dtw_divergence`: no device sync for its checks
        len_x_kept = torch.tensor([host_x[b] for b in kept])
        len_y_kept = torch.tensor([host_y[b] for b in kept])
        band = None
        if attention is not None:
            attn = compact_pairs(attention.detach(), student_mask, teacher_mask, widths)  # (batch, N, M)
            band = attention_band(select(attn), select(len_x), select(len_y), band_base, band_sensitivity,
                                  band_blend, band_penalty)  # fmt: skip
        values = soft_dtw_divergence(select(x), select(y), gamma, len_x_kept, len_y_kept, band=band, impl=impl)
        if keep is None:
            return values
        return x.new_zeros(x.shape[0]).index_put((keep,), values)
