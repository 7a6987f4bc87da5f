"""Activation checkpointing with no graph at all in forward: a region runs once without autograd and again with it
in backward, every tensor it differentiates passed explicitly.

Why not `torch.utils.checkpoint`: its non-reentrant form builds the region's graph in forward and only drops the
saved tensors, so custom autograd functions still run their forward *with* gradient bookkeeping (the Soft-DTW CPU
kernels keep their (B, N, M) alignment matrices E in NumPy memory from forward to backward, outside what it
checkpoints, and the recompute forms a second set); its reentrant form runs the region's own backward, which
accumulates parameter gradients a second time in the step (DDP's reducer expects one per parameter). Here the
forward runs in no-grad mode (the Soft-DTW kernels then compute values only), and the backward recomputes the region
with autograd on and returns the gradients w.r.t. its inputs and parameters through this one node, so each
parameter receives a single accumulation in the outer backward.

The parameters are read by a callable at forward and again at backward (sharding wrappers may swap a module's
parameter objects in between); the gradients are returned by position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class _Recompute(torch.autograd.Function):
    """forward: fn(*inputs) without a graph; backward: fn again with one, gradients w.r.t. inputs and parameters."""

    @staticmethod
    def forward(ctx, fn, params, n_inputs: int, *tensors):  # type: ignore[override]
        ctx.fn, ctx.params, ctx.n_inputs = fn, params, n_inputs
        inputs = tensors[:n_inputs]
        ctx.save_for_backward(*inputs)  # the inputs only: the parameters are read again in backward
        return tuple(fn(*inputs))

    @staticmethod
    def backward(ctx, *grad_outputs):  # type: ignore[override]
        needs = ctx.needs_input_grad[3:]
        inputs = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, needs[: ctx.n_inputs], strict=True)]
        params = list(ctx.params())
        with torch.enable_grad():
            outputs = tuple(ctx.fn(*inputs))
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        wanted += [p for p, need in zip(params, needs[ctx.n_inputs:], strict=True) if need]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if wanted and pairs else [None] * len(wanted))
        grads = [next(found) if t is not None and t.requires_grad else None for t in inputs]
        grads += [next(found) if need else None for need in needs[ctx.n_inputs:]]
        return (None, None, None, *grads)


def recompute_in_backward(
    fn: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor | None],
    params: Callable[[], Sequence[torch.Tensor]],
) -> tuple[torch.Tensor, ...]:
    """fn(*inputs) -> tensors, differentiable w.r.t. `inputs` and the tensors `params()` returns (the parameters fn
    reads from its closure, in a fixed order), with nothing of the region kept between forward and backward but
    `inputs` (pass only tensors the surrounding graph keeps anyway) and fn's closure.

    fn must be deterministic: it runs twice. Without autograd (no-grad mode, or nothing requires a gradient) it
    simply runs once.
    """
    param_list = list(params())
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in [*inputs, *param_list]
    ):
        return tuple(fn(*inputs))
    return _Recompute.apply(fn, params, len(inputs), *inputs, *param_list)
