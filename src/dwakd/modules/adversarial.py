"""Adversarial key–query matching (DSKD-CMA-GA, docs/methods.md#67-dskd-cma-ga): a discriminator and gradient reversal.

The discriminator D tells the teacher's keys (real) from the student's projected queries (fake). Its architecture is
the one in the code the paper cites (stellaevat/DSKD-KQ): a highway layer y = σ(g)·relu(g) + (1 − σ(g))·x with
g = Linear(x) (one linear map for gate and transform, as there), dropout, Linear(width → hidden), LeakyReLU(0.1),
Linear(hidden → 1), giving one logit per position.

`reverse_gradient(x, scale)` is the identity in forward and multiplies the gradient by −scale in backward, so one
backward pass trains D to *minimise* the discrimination loss and whatever produced x to *maximise* it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.scale, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; gradient multiplied by −scale backward."""
    return _GradientReversal.apply(x, scale)


class KeyQueryDiscriminator(nn.Module):
    """D: (positions, width) → (positions,) logits that the input is a teacher key (real)."""

    def __init__(self, width: int, hidden: int = 768, dropout: float = 0.1):
        super().__init__()
        self.highway = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.highway.weight.dtype)
        gate = self.highway(x)
        g = torch.sigmoid(gate)
        x = g * F.relu(gate) + (1 - g) * x
        return self.out(F.leaky_relu(self.hidden(self.dropout(x)), 0.1)).squeeze(-1)
