"""Row selection on the padded (batch, length) grid: which flat positions a loss reads, and how two sides pair up."""

from __future__ import annotations

import torch


def valid_rows(mask: torch.Tensor) -> torch.Tensor:
    """int64 (positions,) indices of the True entries of a (batch, length) mask in the flattened grid, in order."""
    return mask.reshape(-1).nonzero().squeeze(1)


def paired_rows(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices pairing the k-th valid student position with the k-th valid teacher position, k < min(n_b, m_b).

    Masks are (batch, n) and (batch, m); returns two int64 (pairs,) tensors into the flattened grids.
    """
    count = torch.minimum(student_mask.sum(-1), teacher_mask.sum(-1)).view(-1, 1)  # (batch, 1)
    s_keep = student_mask & (student_mask.long().cumsum(-1) <= count)  # the first `count` valid positions
    t_keep = teacher_mask & (teacher_mask.long().cumsum(-1) <= count)
    return s_keep.reshape(-1).nonzero().squeeze(1), t_keep.reshape(-1).nonzero().squeeze(1)
