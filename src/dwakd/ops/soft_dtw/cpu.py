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

The divergence has its own node on this path (`cosine_divergence_cpu`): it takes the unit vectors, forms the three
cosine costs in pooled buffers, runs the three groups in one sweep, and its backward goes from E straight to the
unit vectors (`_alignment_products`), visiting only each row's span of nonzero E when those spans are narrow.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from dwakd.ops._threads import run_threads
from dwakd.ops.soft_dtw.band import SoftBand
from dwakd.ops.soft_dtw.cost import one_minus_gram

_MIN_CELLS_PER_WORKER = 1 << 15
# Zeroed slots after a task's weights: the kernels' padded vector lanes may read a few planes past a task's block
# (values they never use, but they must be finite and in bounds).
_WEIGHT_TAIL = 8 * 64  # a few planes: the padded lanes of the last diagonals read past the task's weights
_NO_BAND = np.zeros((1, 1), dtype=np.float64)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _BufferPool:
    """Work buffers kept between calls, so that a call does not page-fault fresh memory in.

    A fresh multi-megabyte buffer costs one page fault per 4 KiB the kernels touch (the weights, ≈ 12 bytes per
    cell, and the strips of every thread: ≈ 300 faults, a fifth of a B=8, 256 × 256 forward+backward); glibc
    returns such blocks to the system between calls. Work buffers are taken for one call and given back after it;
    E, which leaves the call as the gradient, is lent: it comes back when the last array or tensor using it is freed.
    A few of the largest buffers are kept per dtype (concurrent calls each get their own), at most `MAX_BYTES`.
    """

    KEEP = 12  # buffers kept per dtype (a divergence call takes 9: 3 costs, 3 E, weights and 2 strips)
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


def _sweep(
    gamma: float, plan: _TaskPlan, band: SoftBand | None, store: bool, costs: list[torch.Tensor]
) -> tuple[np.ndarray, list[np.ndarray] | None, list[np.ndarray] | None]:
    """One threaded sweep of every task of `plan` over up to three CPU cost batches in the compute dtype.

    Returns the values R(n, m) (float64, one per task, in task order) and, with `store`, per group E = dR(n, m)/dC
    (an array lent from the pool, in the costs' shape, zero on padding) and each row's span of nonzero columns
    ((batch_g, N_g, 2) int32, [lo, hi)); without `store` the sweep skips the weights and both are None.
    """
    k = _kernels()
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
        grads = [_BUFFERS.lend(tuple(c.shape), np_dtype) for c in costs]  # handed out as the gradient (backward)
        spans = [np.empty((c.shape[0], c.shape[1], 2), dtype=np.int32) for c in costs]
    else:
        workspace = None
        weights = [np.zeros(1, dtype=np_dtype)] * plan.workers  # a one-element "workspace": values only
        grads = [np.zeros((1, 1, 1), dtype=np_dtype)]
        spans = [np.zeros((1, 1, 2), dtype=np.int32)]
    outs = grads + [grads[0]] * (3 - len(grads))
    out_spans = spans + [spans[0]] * (3 - len(spans))
    values = np.empty(plan.tasks.shape[0], dtype=np.float64)
    try:
        _run(k.soft_dtw_forward, plan, (arrays[0], arrays[1], arrays[2], center, width, penalty, band_group,
             float(gamma), np_dtype == np.float32, None, None, values, *outs, *out_spans),
             list(zip(weights, strips)))  # fmt: skip
    finally:
        for buffer in (*strips, *([workspace] if workspace is not None else [])):
            _BUFFERS.give(buffer)
    return values, (grads if store else None), (spans if store else None)


class _SoftDTWCPUFunction(torch.autograd.Function):
    """Values R(n_b, m_b) of up to three cost batches in one threaded sweep; with a gradient the same sweep also
    computes E = dR/dC (see `_cpu_kernels`), and the backward scales it by dL/dR."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, gamma: float, plan: _TaskPlan, band: SoftBand | None, store: bool, *costs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        values, grads, _ = _sweep(gamma, plan, band, store, list(costs))
        ctx.expected_alignments = grads  # (batch_g, N_g, M_g) NumPy arrays: E = dR(n, m)/dC (None without store)
        out = torch.from_numpy(values).to(costs[0].dtype)
        b = plan.group_bounds
        return tuple(out[b[g] : b[g + 1]] for g in range(len(costs)))

    @staticmethod
    def backward(ctx, *grad_values: torch.Tensor):  # type: ignore[override]
        _check_backward(ctx.expected_alignments)
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


def _check_backward(saved_alignments: object) -> None:
    """Refuse a backward the CPU path cannot do: without the E saved by the forward, or with create_graph=True (the
    backward is NumPy/numba code outside autograd: its result would carry no graph, and a second derivative would
    silently miss the Soft-DTW part)."""
    if torch.is_grad_enabled():
        raise RuntimeError("the CPU Soft-DTW path has no second derivative (backward with create_graph=True); use "
                           "impl='reference' for higher-order gradients")
    if saved_alignments is None:
        raise RuntimeError("Soft-DTW CPU: no expected alignments to back-propagate (the forward ran without a "
                           "gradient, or its graph was already freed by a backward without retain_graph)")


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


# The banded products visit (2·cross + self x + self y) nonzero spans; past this fraction of the dense products'
# cells, four BLAS products are faster. Measured on a 2-core AVX-512 EPYC, B=8, N=M=256, D=64, 2 threads: the banded
# kernel takes 0.45 ms at 9 % of the cells (γ = 0.1), 0.96 ms at 23 %, 1.37 ms at 32 %, 1.69 ms at 40 % (γ = 0.8);
# BLAS 1.5 ms whatever E holds.
BANDED_MAX_FRACTION = 0.3


def _span_cells(spans: np.ndarray) -> int:
    """Cells inside the rows' nonzero spans."""
    return int(np.maximum(spans[..., 1] - spans[..., 0], 0).sum())


def _alignment_products(
    alignments: list[np.ndarray], spans: list[np.ndarray], ux: torch.Tensor, uy: torch.Tensor,
    coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """gx = c_xy·E_xy·uy + c_xx·E_xx·ux and gy = c_xy·E_xyᵀ·ux + c_yy·E_yy·uy per sample (c: (batch,) tensors):
    over E's nonzero spans when those are narrow (`_cpu_kernels.alignment_products`), else as four BLAS products."""
    e_xy, e_xx, e_yy = alignments
    visited = 2 * _span_cells(spans[0]) + _span_cells(spans[1]) + _span_cells(spans[2])
    dense = 2 * e_xy.size + e_xx.size + e_yy.size
    if visited > BANDED_MAX_FRACTION * dense:
        c_xy, c_xx, c_yy = (c.view(-1, 1, 1) for c in coefficients)
        t_xy, t_xx, t_yy = (torch.from_numpy(e) for e in alignments)
        gx = torch.bmm(t_xy, uy).mul_(c_xy).add_(torch.bmm(t_xx, ux).mul_(c_xx))
        gy = torch.bmm(t_xy.transpose(1, 2), ux).mul_(c_xy).add_(torch.bmm(t_yy, uy).mul_(c_yy))
        return gx, gy
    gx, gy = torch.empty_like(ux), torch.empty_like(uy)
    arrays = (ux.detach().numpy(), uy.detach().numpy(), *(c.numpy() for c in coefficients), gx.numpy(), gy.numpy())
    counter = np.zeros(1, dtype=np.int64)
    kernel = _kernels().alignment_products
    workers = max(1, min(torch.get_num_threads(), e_xy.shape[0], visited * ux.shape[2] // (1 << 20)))
    run_threads(lambda _: kernel(counter, e_xy, spans[0], e_xx, spans[1], e_yy, spans[2], *arrays), workers)
    return gx, gy


class _CosineDivergenceCPUFunction(torch.autograd.Function):
    """Soft-DTW of the divergence's three cosine costs (cross, self x, self y) from the unit vectors, one sweep.

    The forward forms the costs 1 − u·vᵀ (three BLAS products, dropped after the sweep) and keeps E; the backward
    goes from E straight to the unit vectors' gradients (`_alignment_products`): no cost-matrix gradient is formed
    or scaled, and where E's nonzero band is narrow (small γ) only the band is visited. A self term's E is
    symmetric (R(Cᵀ) = R(C) at equal lengths), so its backward is one product, 2·E·u.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, gamma: float, plan: _TaskPlan, band: SoftBand | None, store: bool, ux: torch.Tensor, uy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the costs live only during the sweep: pooled buffers (three fresh (B, N, M) tensors page-fault their
        # memory in on every call, as long as the products that fill them)
        pairs = ((ux, uy), (ux, ux), (uy, uy))
        buffers = [_BUFFERS.take((ux.shape[0], a.shape[1], b.shape[1]), _NUMPY_DTYPES[ux.dtype]) for a, b in pairs]
        costs: list[torch.Tensor] = []
        try:
            costs = [one_minus_gram(a, b, out=torch.from_numpy(buffer)) for buffer, (a, b) in zip(buffers, pairs)]
            values, alignments, spans = _sweep(gamma, plan, band, store, costs)
        finally:
            del costs
            for buffer in buffers:
                _BUFFERS.give(buffer)
        ctx.save_for_backward(ux, uy)
        ctx.alignments = (alignments, spans) if store else None
        out = torch.from_numpy(values).to(ux.dtype)
        b = plan.group_bounds
        return out[b[0] : b[1]], out[b[1] : b[2]], out[b[2] : b[3]]

    @staticmethod
    def backward(ctx, g_xy: torch.Tensor, g_xx: torch.Tensor, g_yy: torch.Tensor):  # type: ignore[override]
        _check_backward(ctx.alignments)
        ux, uy = ctx.saved_tensors
        alignments, spans = ctx.alignments
        if not _keeps_graph():
            ctx.alignments = None  # E returns to the pool once the products below are done
        # dR/dC = E and C = 1 − u·vᵀ: dL/du = −g·E·v for the cross term, −2·g·E·u for a self term (E symmetric)
        zeros = torch.zeros(ux.shape[0], dtype=ux.dtype)
        coefficients = (
            zeros if g_xy is None else g_xy.detach().to(ux.dtype).neg(),
            zeros if g_xx is None else g_xx.detach().to(ux.dtype).mul(-2.0),
            zeros if g_yy is None else g_yy.detach().to(ux.dtype).mul(-2.0),
        )
        gx, gy = _alignment_products(alignments, spans, ux, uy, tuple(c.contiguous() for c in coefficients))
        return None, None, None, None, gx, gy


def cosine_divergence_cpu(
    ux: torch.Tensor,
    uy: torch.Tensor,
    lengths_x: torch.Tensor,
    lengths_y: torch.Tensor,
    gamma: float,
    band: SoftBand | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-DTW of the cosine costs (cross, self x, self y) of unit vectors ux (batch, N, D) and uy (batch, M, D),
    float32 or float64 CPU tensors, lengths already validated; `band` applies to the cross term. Differentiable
    w.r.t. ux and uy."""
    plan = _plan([(lengths_x, lengths_y), (lengths_x, lengths_x), (lengths_y, lengths_y)], torch.get_num_threads(),
                 (False, True, True))  # fmt: skip
    store = torch.is_grad_enabled() and (ux.requires_grad or uy.requires_grad)
    return _CosineDivergenceCPUFunction.apply(float(gamma), plan, band, store, ux.contiguous(), uy.contiguous())
