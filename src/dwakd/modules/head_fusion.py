"""The `head_fusion` option of methods whose LM-head terms can run through the fused head + divergence op.

`fused`: `dwakd.ops.fused_kd.fused_head_kd` reads hidden states and head weights, no (rows × V) logits;
`dense`: `F.linear` logits (the plain reference path); `auto`: fused on a GPU, and on a CPU under 16-bit autocast
(`bf16: true`); dense on a CPU in fp32. In fp32 on a CPU the dense path's forward KL runs through numba row
kernels, and the fused op's chunked elementwise passes cost 1.1-1.4x its step, while the fused op's memory saving
is what GPUs need. Under bf16 autocast the dense logits are bf16 and those kernels do not apply: on the tiny CPU
recipe the fused op then took 0.40-0.94x the dense step time and 0.45-0.69x its peak memory (sft, dskd, dwakd,
mined; benchmarks/README.md) — on a CPU with bf16 instructions; on an AVX2-only CPU, which emulates them, both
paths run 9x slower than fp32 and `dwakd train` warns (benchmarks/README.md, "16-bit on a CPU"). Either way a
model view without a plain linear head (dense logits from a teacher cache, a LoRA-wrapped or ZeRO-3-partitioned
head) keeps the dense path.
"""

from __future__ import annotations

import torch

from dwakd.ops.autocast import autocast_dtype

HEAD_FUSIONS = ("auto", "fused", "dense")


def use_fused_heads(mode: str, device: torch.device) -> bool:
    """Whether `head_fusion: mode` means the fused op on `device` (for `auto` on a CPU: whether 16-bit autocast is on
    there now, so call it inside the forward)."""
    if mode != "auto":
        return mode == "fused"
    if device.type != "cpu":
        return True
    return autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
