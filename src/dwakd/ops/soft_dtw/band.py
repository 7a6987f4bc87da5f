"""The attention-informed soft band of DWA-KD as the Soft-DTW operators consume it.

docs/methods.md#83-soft-band; how DWA-KD computes it: docs/methods.md#53-attention-informed-band.

The band itself (centre and width from cross-model attention) is computed by the loss; this module only
describes it and applies it: C̃(i, j) = C(i, j) + ρ·[|j − c_i| > w_i], 0-based i and j, no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SoftBand:
    """Per-row band of the cross cost matrix: centre c_i and half-width w_i in column units, penalty ρ outside."""

    center: torch.Tensor  # (batch, rows) float: c_i, the band centre on row i (0-based column coordinate)
    width: torch.Tensor  # (batch, rows) float: w_i, cells with |j − c_i| > w_i are penalised
    penalty: float  # ρ added to every cell outside the band

    def validate(self, batch: int, rows: int) -> None:
        """Raise a ValueError naming the field when the band does not fit a (batch, rows, cols) cost."""
        for name in ("center", "width"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"SoftBand.{name} must be a tensor of shape ({batch}, {rows}), got {type(value)}")
            if value.shape != (batch, rows):
                raise ValueError(f"SoftBand.{name} has shape {tuple(value.shape)}, expected ({batch}, {rows})")

    def outside(self, cols: int) -> torch.Tensor:
        """Bool (batch, rows, cols): True where |j − c_i| > w_i (the penalised cells)."""
        with torch.no_grad():
            j = torch.arange(cols, device=self.center.device, dtype=torch.float64)
            # (batch, rows, cols): distance of column j from the row's centre, in float64 to match the kernels
            dist = (j.view(1, 1, cols) - self.center.detach().double().unsqueeze(-1)).abs()
            return dist > self.width.detach().double().unsqueeze(-1)

    def apply(self, cost: torch.Tensor) -> torch.Tensor:
        """C̃ = C + ρ·outside, as a new (batch, rows, cols) tensor (the dense form used by the reference)."""
        mask = self.outside(cost.shape[-1])
        return cost + mask.to(cost.dtype) * float(self.penalty)
