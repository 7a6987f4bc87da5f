"""Fast CPU Soft-DTW: numba kernels (see `_cpu_kernels`) behind a `torch.autograd.Function`, threads over sequences.

Several cost batches ("groups", e.g. the cross and the two self terms of the divergence) run as one list of tasks,
cut into chunks (largest first) that up to `torch.get_num_threads()` threads pull from a shared counter. Kernels
release the GIL, and the threads are torch's own OpenMP team where torch uses libgomp (`ops._threads`: torch's idle
workers spin on the other cores after every torch op, so threads of our own would wait for them), and pulling work
(rather than a static split) keeps a descheduled thread on a busy machine from stalling the call: the calling thread
simply takes the remaining chunks. A group can be marked symmetric (C(i, j) = C(j, i) and
n = m per sample, as for the divergence's self terms): its tasks sweep only the upper half of the grid.

With a gradient, the forward call also computes E = dR(n, m)/dC of every task (the E-recursion does not depend on
dL/dR; running it right after each task's DP keeps the softmin weights in a per-thread, cache-hot workspace); the
backward only multiplies E by dL/dR. Memory kept for backward: E in the layout of the costs, in the compute dtype
(4 bytes per cost entry in float32); nothing at all when no cost requires a gradient (the forward then skips the
weights and E). Working memory per thread: the weights of its largest task (≈ 12 bytes per cell in float32), the
strip-skewed cost, rings of three diagonals. float32 and float64 are computed natively; other dtypes (bf16, fp16)
are computed in float32. The work buffers (weights, strips) and E come from a pool kept between calls
(`_BufferPool`; E is lent out as the gradient and returns when that is freed), and a backward that does not keep the
graph scales E in place and hands it out: a call page-faults in no fresh memory once the pool holds its sizes.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from dwakd.ops._threads import run_threads
from dwakd.ops.soft_dtw.band import SoftBand

_MIN_CELLS_PER_WORKER = 1 << 15
# Zeroed slots after a task's weights: the kernels' padded vector lanes may read a few planes past a task's block
# (values they never use, but they must be finite and in bounds).
_WEIGHT_TAIL = 8 * 64  # a few planes: the padded lanes of the last diagonals read past the task's weights
_NO_BAND = np.zeros((1, 1), dtype=np.float64)


class _BufferPool:
    """Work buffers kept between calls, so that a call does not page-fault fresh memory in.

    A fresh multi-megabyte buffer costs one page fault per 4 KiB the kernels touch (the weights, ≈ 12 bytes per
    cell, and the strips of every thread: ≈ 300 faults, a fifth of a B=8, 256 × 256 forward+backward); glibc
    returns such blocks to the system between calls. Work buffers are taken for one call and given back after it;
    E, which leaves the call as the gradient, is lent: it comes back when the last array or tensor using it is freed.
    A few of the largest buffers are kept per dtype (concurrent calls each get their own), at most `MAX_BYTES`.
    """

    KEEP = 4  # buffers kept per dtype
    MAX_BYTES = 512 << 20  # per dtype

    def __init__(self) -> None:
        self._free: dict[np.dtype, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` (uninitialised: stale values of an earlier call)."""
        size = int(np.prod(shape))
        with self._lock:
            free = self._free.get(np.dtype(dtype), [])
            for k, buffer in enumerate(free):
                if buffer.size >= size:
                    return free.pop(k)[:size].reshape(shape)
        return np.empty(max(size, 1), dtype=dtype)[:size].reshape(shape)

    def lend(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Like `take`, but the buffer comes back by itself once the returned array (and every view of it, e.g. a
        tensor from `torch.from_numpy`) is freed."""
        array = self.take(shape, dtype)
        finalizer = weakref.finalize(array, self.give, _root(array))
        finalizer.atexit = False
        return array

    def give(self, array: np.ndarray) -> None:
        """Return a buffer from `take` (or any array) for later calls."""
        buffer = _root(array)
        if not isinstance(buffer, np.ndarray) or buffer.ndim != 1:
            return
        with self._lock:
            free = self._free.setdefault(buffer.dtype, [])
            free.append(buffer)
            free.sort(key=lambda b: b.size)
            del free[: max(0, len(free) - self.KEEP)]  # the smallest go first
            while free and sum(b.nbytes for b in free) > self.MAX_BYTES:
                free.pop()  # then the largest, above the byte cap


def _root(array: np.ndarray) -> np.ndarray:
    """The array that owns the memory `array` views."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


_BUFFERS = _BufferPool()


def _new_workspace(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Uninitialised memory for the kernels' weights, reused between calls (a hook: the tests fill it with NaN to
    prove that no slot the kernels read is left unwritten)."""
    return _BUFFERS.take(shape, dtype)


def _kernels():
    """The numba kernel module, imported lazily (first import compiles or loads the on-disk cache)."""
    from dwakd.ops.soft_dtw import _cpu_kernels

    return _cpu_kernels


@dataclass
class _TaskPlan:
    """Every (group, sample) DP of one call: the kernels' task table and the chunks of work threads pull."""

    tasks: np.ndarray  # (T, 5) int64: group, sample, n, m, symmetric (see _cpu_kernels.plan_tasks)
    group_bounds: list[int]  # tasks of group g are rows group_bounds[g]:group_bounds[g + 1] (in group order)
    weight_cells: int  # weights of the largest task: the per-thread workspace of a call with a gradient
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
    sym_groups = np.zeros(len(lengths), dtype=np.int64)
    for g, sym in enumerate(symmetric):
        if sym:
            if not np.array_equal(ns[g], ms[g]):
                raise ValueError(f"group {g} is marked symmetric but its lengths differ: {ns[g]} vs {ms[g]}")
            sym_groups[g] = 1
    sizes = [len(n) for n in ns]
    tasks, weight_cells, order, bounds, cells = _kernels().plan_tasks(
        np.concatenate(ns), np.concatenate(ms), np.array(sizes, dtype=np.int64), sym_groups, _MIN_CELLS_PER_WORKER
    )
    # a thread is worth its hand-off latency only with enough cells to sweep (~0.1 ms of work each)
    workers = max(1, min(workers, len(bounds) - 1, int(cells) // _MIN_CELLS_PER_WORKER))
    group_bounds = [0]
    for size in sizes:
        group_bounds.append(group_bounds[-1] + size)
    return _TaskPlan(tasks, group_bounds, int(weight_cells), order, bounds, workers)


def _run(kernel, plan: _TaskPlan, args: tuple, per_thread: list | None = None) -> None:
    """Run `kernel(order, bounds, counter, tasks, *args)` in up to `plan.workers` threads (the calling one included)
    that pull chunks from one atomic counter, so a descheduled thread never stalls the call.

    `per_thread[i]`, if given, replaces the Nones in `args`, in order, for thread i (its own workspaces).
    """
    counter = np.zeros(1, dtype=np.int64)

    def call(i: int) -> None:
        own = args
        if per_thread is not None:
            mine = iter(per_thread[i])
            own = tuple(next(mine) if a is None else a for a in args)
        kernel(plan.order, plan.bounds, counter, plan.tasks, *own)

    run_threads(call, plan.workers)


class _SoftDTWCPUFunction(torch.autograd.Function):
    """Values R(n_b, m_b) of up to three cost batches in one threaded sweep; with a gradient the same sweep also
    computes E = dR/dC (see `_cpu_kernels`), and the backward scales it by dL/dR."""

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
        rows, cols = int(plan.tasks[:, k.ROWS].max()), int(plan.tasks[:, k.COLS].max())
        strips = [_BUFFERS.take(k.strip_shape(rows, cols), np_dtype) for _ in range(plan.workers)]
        for s in strips:
            s.fill(0)  # finite values in the cells off the grid that padding lanes read
        if store:
            # one weight workspace per thread (largest task + a zeroed tail for the padded vector lanes), and E
            workspace = _new_workspace((plan.workers, plan.weight_cells + _WEIGHT_TAIL), np_dtype)
            workspace[:, plan.weight_cells :] = 0
            weights = list(workspace)
            grads = [_BUFFERS.lend(c.shape, np_dtype) for c in costs]  # handed out as the gradient (backward)
        else:
            workspace = None
            weights = [np.zeros(1, dtype=np_dtype)] * plan.workers  # a one-element "workspace": values only
            grads = [np.zeros((1, 1, 1), dtype=np_dtype)]
        outs = grads + [grads[0]] * (3 - len(grads))
        values = np.empty(plan.tasks.shape[0], dtype=np.float64)
        try:
            _run(k.soft_dtw_forward, plan, (arrays[0], arrays[1], arrays[2], center, width, penalty, band_group,
                 float(gamma), np_dtype == np.float32, None, None, values, *outs),
                 list(zip(weights, strips)))  # fmt: skip
        finally:
            for buffer in (*strips, *([workspace] if workspace is not None else [])):
                _BUFFERS.give(buffer)
        ctx.expected_alignments = grads if store else None  # (batch_g, N_g, M_g) NumPy arrays: E = dR(n, m)/dC
        out = torch.from_numpy(values).to(dtype)
        b = plan.group_bounds
        return tuple(out[b[g] : b[g + 1]] for g in range(len(costs)))

    @staticmethod
    def backward(ctx, *grad_values: torch.Tensor):  # type: ignore[override]
        if ctx.expected_alignments is None:
            raise RuntimeError("Soft-DTW CPU: no expected alignments to back-propagate (the forward ran without a "
                               "gradient, or its graph was already freed by a backward without retain_graph)")
        # Without retain_graph nothing reads E again: scale it in place and hand it out as the gradient instead of
        # allocating (and page-faulting in) a second B × N × M array
        in_place = not _keeps_graph()
        grads = []
        for e, gv in zip(ctx.expected_alignments, grad_values):
            if gv is None:
                grads.append(None)
                continue
            scale = gv.detach().to("cpu", torch.float64).numpy().astype(e.dtype)[:, None, None]  # (batch, 1, 1)
            out = e if in_place else np.empty_like(e)  # else a fresh array: E is kept for another backward
            np.multiply(e, scale, out=out)
            grads.append(torch.from_numpy(out))
        if in_place:
            ctx.expected_alignments = None
        return (None, None, None, None, *grads)


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True), so a saved tensor may be read again.

    PyTorch's own AOT autograd asks the engine the same way; if this private query ever disappears, assume it does
    (correct, one allocation more).
    """
    query = getattr(getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None)
    if query is None:
        return True
    try:
        return bool(query())
    except RuntimeError:  # not inside a backward run by the engine
        return True


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
