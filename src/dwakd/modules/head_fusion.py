"""The `head_fusion` option of methods whose LM-head terms can run through the fused head + divergence op.

`fused`: `dwakd.ops.fused_kd.fused_head_kd` reads hidden states and head weights, no (rows × V) logits;
`dense`: `F.linear` logits (the plain reference path); `auto`: fused on a GPU, dense on CPU — there the fused op's
chunked elementwise passes cost 1.1-1.4x the dense step (benchmarks/README.md), while its memory saving is what
GPUs need. Either way a model view without a plain linear head (dense logits from a teacher cache, a LoRA-wrapped
or ZeRO-3-partitioned head) keeps the dense path.
"""

from __future__ import annotations

import torch

HEAD_FUSIONS = ("auto", "fused", "dense")


def use_fused_heads(mode: str, device: torch.device) -> bool:
    """Whether `head_fusion: mode` means the fused op on `device`."""
    return mode == "fused" or (mode == "auto" and device.type != "cpu")
