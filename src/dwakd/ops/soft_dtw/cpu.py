"""Fast CPU Soft-DTW: numba kernels (see `_cpu_kernels`) behind a `torch.autograd.Function`, threads over sequences.

Several cost batches ("groups", e.g. the cross and the two self terms of the divergence) run as one list of tasks,
cut into chunks (largest first) that up to `torch.get_num_threads()` threads pull from a shared counter. Kernels
release the GIL, so plain Python threads give true parallelism without a second OpenMP pool competing with torch's,
and pulling work (rather than a static split) keeps a descheduled thread on a busy machine from stalling the call:
the calling thread simply takes the remaining chunks. A group can be marked symmetric (C(i, j) = C(j, i) and
n = m per sample, as for the divergence's self terms): its tasks sweep only the upper half of the grid.

Memory kept for backward: the three softmin weights per computed cell (padded per diagonal, see `_cpu_kernels`), in
the compute dtype (≈ 12 bytes per cell in float32); nothing else, and nothing at all when no cost requires a
gradient (the forward then skips the weights). Working memory: rings of three diagonals per running task.
float32 and float64 are computed natively; other dtypes (bf16, fp16) are computed in float32. Buffers come from
NumPy (glibc reuses freed blocks of the same size; torch's CPU allocator page-faults each fresh block in again).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from dwakd.ops.soft_dtw.band import SoftBand

_MIN_CELLS_PER_WORKER = 1 << 15
# Zeroed slots after the last task's weights: the kernels' padded vector lanes may read up to two diagonals' worth
# of planes past a task's block (values they never use, but they must be finite and in bounds).
_WEIGHT_TAIL = 8 * 64
_NO_BAND = np.zeros((1, 1), dtype=np.float64)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process-wide worker pool (created on first use, one thread per CPU)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="soft_dtw")
        return _POOL


def _kernels():
    """The numba kernel module, imported lazily (first import compiles or loads the on-disk cache)."""
    from dwakd.ops.soft_dtw import _cpu_kernels

    return _cpu_kernels


@dataclass
class _TaskPlan:
    """Every (group, sample) DP of one call: the kernels' task table and the chunks of work threads pull."""

    tasks: np.ndarray  # (T, 6) int64: group, sample, n, m, symmetric, weight offset (see _cpu_kernels.plan_tasks)
    group_bounds: list[int]  # tasks of group g are rows group_bounds[g]:group_bounds[g + 1] (in group order)
    weight_cells: int  # weights over all tasks
    order: np.ndarray  # (T,) int64: task ids by decreasing work
    bounds: np.ndarray  # (chunks + 1,) int64: chunk c is order[bounds[c]:bounds[c + 1]]
    workers: int  # threads to use (1: run in the calling thread)


def _int64_numpy(values: torch.Tensor) -> np.ndarray:
    """A CPU int64 NumPy view (or copy) of a lengths tensor."""
    if values.device.type != "cpu" or values.dtype != torch.int64:
        values = values.to("cpu", torch.int64)
    return values.detach().numpy()


def _plan(
    lengths: list[tuple[torch.Tensor, torch.Tensor]], workers: int, symmetric: tuple[bool, ...] = ()
) -> _TaskPlan:
    """Build the task list for groups with per-sample (lengths_x, lengths_y); `symmetric[g]` marks group g."""
    ns = [_int64_numpy(lx) for lx, _ in lengths]
    ms = [_int64_numpy(ly) for _, ly in lengths]
    sym_groups = np.array([g < len(symmetric) and bool(symmetric[g]) for g in range(len(lengths))], dtype=np.int64)
    for g in np.flatnonzero(sym_groups):
        if not np.array_equal(ns[g], ms[g]):
            raise ValueError(f"group {g} is marked symmetric but its lengths differ: {ns[g]} vs {ms[g]}")
    sizes = np.array([len(n) for n in ns], dtype=np.int64)
    tasks, weight_cells, order, bounds, cells = _kernels().plan_tasks(
        np.concatenate(ns), np.concatenate(ms), sizes, sym_groups, _MIN_CELLS_PER_WORKER
    )
    # a thread is worth its hand-off latency only with enough cells to sweep (~0.1 ms of work each)
    workers = max(1, min(workers, len(bounds) - 1, int(cells) // _MIN_CELLS_PER_WORKER))
    group_bounds = [0, *np.cumsum(sizes).tolist()]
    return _TaskPlan(tasks, group_bounds, int(weight_cells), order, bounds, workers)


def _run(kernel, plan: _TaskPlan, *args) -> None:
    """Run `kernel(order, bounds, counter, tasks, *args)` in up to `plan.workers` threads (the calling one
    included) that pull chunks from one atomic counter, so a descheduled thread never stalls the call."""
    counter = np.zeros(1, dtype=np.int64)
    call = (plan.order, plan.bounds, counter, plan.tasks, *args)
    if plan.workers == 1:
        kernel(*call)
        return
    futures = [_pool().submit(kernel, *call) for _ in range(plan.workers - 1)]
    kernel(*call)
    for f in futures:
        f.result()


class _SoftDTWCPUFunction(torch.autograd.Function):
    """Values R(n_b, m_b) of up to three cost batches in one threaded sweep; backward from stored softmin weights."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, gamma: float, plan: _TaskPlan, band: SoftBand | None, store: bool, *costs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        k = _kernels()
        dtype = costs[0].dtype
        arrays = [c.detach().contiguous().numpy() for c in costs]  # (batch_g, N_g, M_g) views, no copy if contiguous
        while len(arrays) < 3:
            arrays.append(arrays[0])
        if band is not None:
            center = band.center.detach().to("cpu", torch.float64).contiguous().numpy()  # (batch, N)
            width = band.width.detach().to("cpu", torch.float64).contiguous().numpy()  # (batch, N)
            band_group, penalty = 0, float(band.penalty)
        else:
            center = width = _NO_BAND
            band_group, penalty = -1, 0.0
        np_dtype = arrays[0].dtype
        if store:
            weights = np.empty(plan.weight_cells + _WEIGHT_TAIL, dtype=np_dtype)
            weights[plan.weight_cells :] = 0
        else:
            weights = np.zeros(1, dtype=np_dtype)
        values = np.empty(plan.tasks.shape[0], dtype=np.float64)
        _run(k.soft_dtw_forward, plan, arrays[0], arrays[1], arrays[2], center, width, penalty, band_group,
             float(gamma), store, np_dtype == np.float32, weights, values)  # fmt: skip
        ctx.plan = plan
        ctx.weights = weights if store else None
        ctx.shapes = [tuple(c.shape) for c in costs]
        ctx.np_dtype = np_dtype
        out = torch.from_numpy(values).to(dtype)
        b = plan.group_bounds
        return tuple(out[b[g] : b[g + 1]] for g in range(len(costs)))

    @staticmethod
    def backward(ctx, *grad_values: torch.Tensor):  # type: ignore[override]
        if ctx.weights is None:
            raise RuntimeError("Soft-DTW CPU forward ran without storing its weights (no input required a gradient)")
        k = _kernels()
        plan: _TaskPlan = ctx.plan
        b = plan.group_bounds
        scale = np.zeros(plan.tasks.shape[0], dtype=np.float64)  # dL/dR(n_b, m_b) per task
        for g, gv in enumerate(grad_values):
            if gv is not None:
                scale[b[g] : b[g + 1]] = gv.detach().to("cpu", torch.float64).numpy()
        arrays = [np.empty(shape, dtype=ctx.np_dtype) for shape in ctx.shapes]  # NumPy: see the module docstring
        grads = [torch.from_numpy(a) for a in arrays]
        while len(arrays) < 3:
            arrays.append(arrays[0])
        _run(k.soft_dtw_backward, plan, ctx.weights, scale, arrays[0], arrays[1], arrays[2])
        return (None, None, None, None, *grads)


def soft_dtw_cpu_groups(
    costs: list[torch.Tensor],
    lengths: list[tuple[torch.Tensor, torch.Tensor]],
    gamma: float,
    band: SoftBand | None = None,
    symmetric: tuple[bool, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """Soft-DTW of up to three (batch_g, N_g, M_g) cost batches in one call; `band` applies to the first only.

    Inputs may live on any device (they are computed on the CPU and the results moved back). Lengths must already
    be validated (1 ≤ n ≤ N). `symmetric[g]` promises that group g's costs are symmetric with equal lengths per
    sample (only their upper triangle is read). Returns one (batch_g,) tensor per group, differentiable w.r.t. each
    cost.
    """
    if not 1 <= len(costs) <= 3:
        raise ValueError(f"soft_dtw_cpu_groups takes 1 to 3 cost batches, got {len(costs)}")
    for g, sym in enumerate(symmetric):
        if sym and costs[g].shape[1] != costs[g].shape[2]:
            raise ValueError(f"group {g} is marked symmetric but its costs are not square: {tuple(costs[g].shape)}")
    device, dtype = costs[0].device, costs[0].dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    on_cpu = device.type == "cpu" and dtype == compute
    cpu_costs = costs if on_cpu and all(c.dtype == dtype for c in costs) else [c.to("cpu", compute) for c in costs]
    plan = _plan(lengths, torch.get_num_threads(), symmetric)
    store = torch.is_grad_enabled() and any(c.requires_grad for c in costs)  # forward-only calls skip the weights
    values = _SoftDTWCPUFunction.apply(float(gamma), plan, band, store, *cpu_costs)
    return values if on_cpu else tuple(v.to(device, dtype) for v in values)


def soft_dtw_cpu(
    cost: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor,
    lengths_y: torch.Tensor,
    band: SoftBand | None = None,
) -> torch.Tensor:
    """Soft-DTW values (batch,) of one (batch, N, M) cost batch on the fast CPU path."""
    return soft_dtw_cpu_groups([cost], [(lengths_x, lengths_y)], gamma, band)[0]
