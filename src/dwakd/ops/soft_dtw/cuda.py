"""GPU Soft-DTW: the Triton kernels of `_triton_kernels` behind a `torch.autograd.Function`.

All groups (the divergence's cross and two self terms, or one batch) run as one list of (group, sample) tasks in
one launch per pass, one program per task: skew (parallel), forward sweep, and in backward skew again, E sweep,
unskew (parallel). Each task owns a padded N_g·M_g slot of a flat float32 scratch (offsets known from the shapes,
so no host synchronisation), and its DP touches only its n·m valid cells. Memory kept for backward: that scratch
(4 B per padded cell, the softmin S) and one float per diagonal; backward needs a second scratch of the same size.

Every input dtype is computed in float32 (costs are upcast when loaded; bf16 costs give bf16 values and gradients).
Needs CUDA tensors and Triton (`pip install 'dwakd[gpu]'`). Tests run the same kernels on CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1 set before Triton is imported); that is a test harness, not a CPU path.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from dwakd.ops._transfer import to_device
from dwakd.ops.soft_dtw.band import SoftBand

# Launch configuration (module-level so tests can force the chunked sweep on small sizes).
_SINGLE_MAX_ROWS = 4096  # up to this many rows a sweep keeps one row per lane for the whole DP
_CHUNK_BLOCK = 1024  # rows per chunk of the chunked sweep (longer inputs)
_SKEW_ROWS = 8  # rows per program of the parallel skew / unskew passes
_SKEW_COLS = 128  # columns per chunk of those passes (BLOCK_ROWS × BLOCK_COLS elements per step)
_MAX_TASKS = 65535  # the task axis of the skew / unskew grids is CUDA's second grid dimension


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (the GPU path's only extra dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def _interpreting() -> bool:
    """Whether Triton runs kernels in its NumPy interpreter (TRITON_INTERPRET=1): the test harness on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    """The Triton kernel module, imported lazily (importing it decides compiled vs interpreted kernels)."""
    from dwakd.ops.soft_dtw import _triton_kernels

    return _triton_kernels


@dataclass
class _Plan:
    """Every (group, sample) task of one call: per-task metadata on the device and the launch configuration."""

    group: torch.Tensor  # (tasks,) int32
    sample: torch.Tensor  # (tasks,) int32
    len_n: torch.Tensor  # (tasks,) int32
    len_m: torch.Tensor  # (tasks,) int32
    s_off: torch.Tensor  # (tasks,) int64: start of the task's slot in the scratch
    shapes: list[tuple[int, int, int]]  # (batch, N, M) per group
    cells: int  # scratch size: Σ_g batch·N·M
    max_rows: int
    ring_row: int  # floats per ring row (≥ max N + 2)
    delta_stride: int  # floats per task of Δ (≥ max N + max M + 3)
    block: int
    single: bool
    num_warps: int

    @property
    def tasks(self) -> int:
        return self.group.shape[0]


def _launch_config(max_rows: int) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) of the sweeps: one row per lane when it fits, else chunks of _CHUNK_BLOCK rows."""
    if max_rows <= _SINGLE_MAX_ROWS:
        block, single = max(32, _next_pow2(max_rows)), True
    else:
        block, single = _CHUNK_BLOCK, False
    return block, single, max(1, min(16, block // 128))  # ≈ 4 rows per thread


def _next_pow2(value: int) -> int:
    """Smallest power of two ≥ value (≥ 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


@functools.lru_cache(maxsize=64)
def _static_meta(shapes: tuple[tuple[int, int, int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-task group and sample (int32) and scratch offsets (int64) on `device`, cached per shape list."""
    group, sample, offset = [], [], []
    cells = 0
    for g, (batch, rows, cols) in enumerate(shapes):
        group += [g] * batch
        sample += range(batch)
        offset += range(cells, cells + batch * rows * cols, rows * cols)
        cells += batch * rows * cols
    ids = to_device(torch.tensor([group, sample], dtype=torch.int32), device)  # no stream sync (ops._transfer)
    return ids[0], ids[1], to_device(torch.tensor(offset, dtype=torch.int64), device)


@functools.lru_cache(maxsize=64)
def _table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """int64 (3, 3) per-group table on `device` (strides, or shapes), missing groups repeating group 0; cached."""
    rows = rows + (rows[0],) * (3 - len(rows))
    return to_device(torch.tensor(rows, dtype=torch.int64), device)


def _plan(shapes: list[tuple[int, int, int]], lengths: list[tuple[torch.Tensor, torch.Tensor]], device) -> _Plan:
    """Task list of the groups (no host sync: offsets come from the shapes, lengths stay on the device)."""
    group, sample, s_off = _static_meta(tuple(shapes), device)
    len_n = torch.cat([lx.to(device) for lx, _ in lengths]).to(torch.int32)
    len_m = torch.cat([ly.to(device) for _, ly in lengths]).to(torch.int32)
    cells = sum(b * n * m for b, n, m in shapes)
    max_rows = max(s[1] for s in shapes)
    max_cols = max(s[2] for s in shapes)
    block, single, num_warps = _launch_config(max_rows)
    # strides rounded to multiples of 16: one Triton specialisation for every batch shape (see _triton_kernels)
    return _Plan(group, sample, len_n, len_m, s_off, shapes, cells, max_rows, _round16(max_rows + 2),
                 _round16(max_rows + max_cols + 3), block, single, num_warps)  # fmt: skip


def _round16(value: int) -> int:
    """Smallest multiple of 16 ≥ value."""
    return -(-value // 16) * 16


def _three(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pad a list of 1 to 3 tensors to three pointers (unused ones repeat the first)."""
    return list(tensors) + [tensors[0]] * (3 - len(tensors))


def _launch_opts(num_warps: int) -> dict:
    """Compile options of every launch: no software pipelining across the barriers; FMA contraction on."""
    return {"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": True}


def _skew_grid(plan: _Plan) -> tuple[int, int]:
    """Grid of the skew / unskew passes: (row blocks, tasks); rows take the axis without a 65535 limit."""
    return (-(-plan.max_rows // _SKEW_ROWS), plan.tasks)


def _skew_cols(plan: _Plan) -> int:
    """Columns per chunk of the skew / unskew passes (no wider than the widest cost)."""
    return min(_SKEW_COLS, _next_pow2(max(s[2] for s in plan.shapes)))


def _skew(plan: _Plan, costs: list[torch.Tensor], band: SoftBand | None, out: torch.Tensor) -> None:
    """C̃ (band applied to group 0) of every task into its skewed block of `out` (float32)."""
    k = _kernels()
    device = out.device
    if band is not None:
        center = band.center.detach().to(device=device, dtype=torch.float64).contiguous()
        width = band.width.detach().to(device=device, dtype=torch.float64).contiguous()
        band_args = (center, width, center.shape[1], float(band.penalty), 0)
    else:
        dummy = torch.zeros(1, dtype=torch.float64, device=device)
        band_args = (dummy, dummy, 0, 0.0, -1)
    strides = _table(tuple(c.stride() for c in costs), device)
    k.skew_cost_kernel[_skew_grid(plan)](
        *_three(costs), strides, plan.group, plan.sample, plan.len_n, plan.len_m, plan.s_off, *band_args, out,
        BLOCK_R=_SKEW_ROWS, BLOCK_J=_skew_cols(plan), BANDED=band is not None, **_launch_opts(4),
    )  # fmt: skip


class _SoftDTWTritonFunction(torch.autograd.Function):
    """Values R(n_b, m_b) of up to three cost batches in one launch per pass; backward by the E-recursion."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, gamma: float, plan: _Plan, band: SoftBand | None, *costs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        k = _kernels()
        device = costs[0].device
        sbuf = torch.empty(plan.cells, dtype=torch.float32, device=device)
        ring = torch.empty(plan.tasks * 3 * plan.ring_row, dtype=torch.float32, device=device)
        delta = torch.zeros(plan.tasks, plan.delta_stride, dtype=torch.float32, device=device)
        values = torch.empty(plan.tasks, dtype=torch.float64, device=device)
        _skew(plan, list(costs), band, sbuf)
        k.soft_dtw_fwd_kernel[(plan.tasks,)](
            plan.len_n, plan.len_m, plan.s_off, sbuf, ring, plan.ring_row, delta, plan.delta_stride, values,
            float(gamma), k.LOG2E / float(gamma), BLOCK=plan.block, SINGLE=plan.single,
            **_launch_opts(plan.num_warps),
        )  # fmt: skip
        ctx.save_for_backward(*costs)
        ctx.plan, ctx.band, ctx.gamma = plan, band, float(gamma)
        ctx.sbuf, ctx.delta = sbuf, delta
        sizes = [s[0] for s in plan.shapes]
        return tuple(v.to(costs[0].dtype, copy=True) for v in values.split(sizes))

    @staticmethod
    def backward(ctx, *grad_values: torch.Tensor):  # type: ignore[override]
        k = _kernels()
        plan: _Plan = ctx.plan
        costs = list(ctx.saved_tensors)
        device = costs[0].device
        # dL/dR(n_b, m_b) per task; a group whose value is unused gets zero
        scale = torch.cat([
            torch.zeros(shape[0], device=device) if gv is None else gv.detach().to(device, torch.float32).reshape(-1)
            for gv, shape in zip(grad_values, plan.shapes)
        ])  # fmt: skip
        cbuf = torch.empty(plan.cells, dtype=torch.float32, device=device)
        ring = torch.empty(plan.tasks * 3 * plan.ring_row, dtype=torch.float32, device=device)
        _skew(plan, costs, ctx.band, cbuf)
        k.soft_dtw_bwd_kernel[(plan.tasks,)](
            plan.len_n, plan.len_m, plan.s_off, ctx.sbuf, cbuf, ring, plan.ring_row, ctx.delta, plan.delta_stride,
            scale, k.LOG2E / ctx.gamma, BLOCK=plan.block, SINGLE=plan.single, **_launch_opts(plan.num_warps),
        )  # fmt: skip
        grads = [torch.empty(c.shape, dtype=c.dtype, device=device) for c in costs]
        strides = _table(tuple(g.stride() for g in grads), device)
        shapes = _table(tuple((s[1], s[2], 0) for s in plan.shapes), device)  # (N_g, M_g) per group
        k.unskew_grad_kernel[_skew_grid(plan)](
            *_three(grads), strides, shapes, plan.group, plan.sample, plan.len_n, plan.len_m, plan.s_off, cbuf,
            BLOCK_R=_SKEW_ROWS, BLOCK_J=_skew_cols(plan), **_launch_opts(4),
        )  # fmt: skip
        return (None, None, None, *grads)


def soft_dtw_cuda_groups(
    costs: list[torch.Tensor],
    lengths: list[tuple[torch.Tensor, torch.Tensor]],
    gamma: float,
    band: SoftBand | None = None,
) -> tuple[torch.Tensor, ...]:
    """Soft-DTW of up to three (batch_g, N_g, M_g) cost batches in one launch; `band` applies to the first only.

    Costs must be CUDA tensors on one device (and share a dtype: others are cast to the first's); lengths must
    already be validated (1 ≤ n ≤ N). Returns one (batch_g,) tensor per group in the cost dtype, differentiable
    w.r.t. each cost. Raises NotImplementedError naming the alternatives when CUDA or Triton is missing.
    """
    if not 1 <= len(costs) <= 3:
        raise ValueError(f"soft_dtw_cuda_groups takes 1 to 3 cost batches, got {len(costs)}")
    device = costs[0].device
    if device.type != "cuda" and not (_interpreting() and device.type == "cpu"):
        raise NotImplementedError(
            f"soft_dtw impl='cuda' needs CUDA tensors, got {device.type}; use impl='cpu' (fast CPU kernels, "
            "any input device) or impl='reference' (plain PyTorch on the input device)"
        )
    if not triton_available():
        raise NotImplementedError(
            "soft_dtw impl='cuda' needs Triton (pip install 'dwakd[gpu]' or 'triton>=3.0'); use impl='cpu' "
            "(fast CPU kernels, any input device) or impl='reference' (plain PyTorch on the input device)"
        )
    if any(c.device != device for c in costs):
        raise ValueError(f"all cost batches must be on {device}, got {[str(c.device) for c in costs]}")
    if sum(c.shape[0] for c in costs) > _MAX_TASKS:
        raise ValueError(f"impl='cuda' runs at most {_MAX_TASKS} sequence pairs per call; split the batch")
    dtype = costs[0].dtype
    costs = [c if c.dtype == dtype else c.to(dtype) for c in costs]
    plan = _plan([tuple(c.shape) for c in costs], lengths, device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _SoftDTWTritonFunction.apply(float(gamma), plan, band, *costs)
    return _SoftDTWTritonFunction.apply(float(gamma), plan, band, *costs)
