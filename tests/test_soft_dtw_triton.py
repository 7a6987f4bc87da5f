"""The Triton (GPU) Soft-DTW path against the float64 PyTorch reference, naive loops and the float64 CPU path.

Three kinds of tests:
- interpreter checks: the Triton kernels run on CPU tensors under Triton's NumPy interpreter. TRITON_INTERPRET is
  read when the kernels are decorated, and interpreted kernels must never share a process with compiled ones, so
  all checks run in ONE child process (`python tests/test_soft_dtw_triton.py --interpreter-child`); the parent
  reports one test per check. Skipped when Triton is not installed. Kept small: the interpreter is slow.
- compile check (no GPU needed): the kernels compile to PTX/cubin for sm_80 and sm_90 with the bundled ptxas.
- `gpu` tests: the compiled kernels on CUDA at B = 8, N = M = 512 and 2048 (skipped without CUDA).

Tolerances (float32 maths, R stored relative to a per-diagonal baseline; see `_triton_kernels`): values 1e-5
relative; gradients (alignment probabilities in [0, 1]) 5e-5 absolute on the small interpreter cases, 1e-3 at
N = 512 and 2e-3 at N = 2048, γ = 0.01, where float32 rounding of R gives ~1e-4 / ~4e-4 on uniform random costs
(the CPU path, with R in float64, is ~1e-7); bf16 costs: 1e-2 (bf16 outputs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _soft_dtw_helpers import naive_batch, random_band, random_batch, torch_threads
from _triton_helpers import compile_kernel, skip_unless_aot_compile

from dwakd.ops.soft_dtw import SoftBand, cosine_cost, soft_dtw, soft_dtw_divergence
from dwakd.ops.soft_dtw.cuda import triton_available

HAS_TRITON = triton_available()
VALUE_RTOL = 1e-5
GRAD_ATOL = 5e-5
BF16_TOL = 1e-2
CHILD_FLAG = "--interpreter-child"


def _value_and_grad(
    cost: torch.Tensor, gamma: float, lx, ly, band, impl: str, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """soft_dtw values (batch,) and d(Σ weights·values)/d cost (batch, N, M) on one path."""
    leaf = cost.detach().clone().requires_grad_(True)
    value = soft_dtw(leaf, gamma, lx, ly, band=band, impl=impl)
    total = value.sum() if weights is None else (value * weights.to(value.dtype)).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return value.detach(), grad


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# Interpreter checks (run in the child process on CPU tensors with impl="cuda")


def _check_ragged(gamma: float, banded: bool) -> Callable[[], None]:
    def check() -> None:
        cost, lx, ly = random_batch(3, 9, 8, seed=int(100 * gamma) + banded, dtype=torch.float32)
        band = random_band(3, 9, 8, seed=7, penalty=1.0) if banded else None
        got_v, got_g = _value_and_grad(cost, gamma, lx, ly, band, "cuda")
        want_v, want_g = _value_and_grad(cost.double(), gamma, lx, ly, band, "reference")
        assert got_v.dtype == torch.float32 and got_g.dtype == torch.float32
        _close(got_v, want_v, VALUE_RTOL, 1e-5)
        _close(got_g, want_g, 0, GRAD_ATOL)
        assert got_g[1:].abs().sum() > 0  # the ragged samples do get gradient

    return check


def _check_bf16(banded: bool) -> Callable[[], None]:
    def check() -> None:
        cost, lx, ly = random_batch(2, 10, 8, seed=6, dtype=torch.float32)
        low = cost.to(torch.bfloat16)
        band = random_band(2, 10, 8, seed=6) if banded else None
        got_v, got_g = _value_and_grad(low, 0.1, lx, ly, band, "cuda")
        want_v, want_g = _value_and_grad(low.double(), 0.1, lx, ly, band, "reference")
        assert got_v.dtype == torch.bfloat16 and got_g.dtype == torch.bfloat16
        _close(got_v, want_v, BF16_TOL, 0)
        _close(got_g, want_g, 0, BF16_TOL)

    return check


def _check_naive_loops() -> None:
    # independent of the PyTorch reference: explicit float64 loops over paths (α/β sums), band by loops
    cost, lx, ly = random_batch(3, 8, 11, seed=3, dtype=torch.float32)
    band = random_band(3, 8, 11, seed=3, penalty=0.7)
    for gamma in (0.5, 0.01):
        got_v, got_g = _value_and_grad(cost, gamma, lx, ly, band, "cuda")
        want_v, want_g = naive_batch(cost, gamma, lx, ly, band)
        _close(got_v, want_v, VALUE_RTOL, 1e-5)
        _close(got_g, want_g, 0, GRAD_ATOL)


def _check_grad_output_scaling() -> None:
    cost, lx, ly = random_batch(3, 7, 8, seed=2, dtype=torch.float32)
    weights = torch.tensor([2.0, -1.0, 0.5])
    leaf = cost.clone().requires_grad_(True)
    value = soft_dtw(leaf, 0.1, lx, ly, impl="cuda")
    (g1,) = torch.autograd.grad((value * weights).sum(), leaf, retain_graph=True)
    (g2,) = torch.autograd.grad((value * weights).sum(), leaf)  # a second backward through the same graph
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    _, want = _value_and_grad(cost.double(), 0.1, lx, ly, None, "reference", weights=weights.double())
    _close(g1, want, 0, 2 * GRAD_ATOL)
    (g_first,) = torch.autograd.grad(soft_dtw(leaf, 0.1, lx, ly, impl="cuda")[0], leaf)  # unused samples: 0
    assert g_first[1:].abs().sum() == 0 and g_first[0].abs().sum() > 0


def _check_padding_never_leaks() -> None:
    cost, lx, ly = random_batch(3, 9, 7, seed=8, dtype=torch.float32)
    lx[1], ly[1] = 4, 2
    poisoned = cost.clone()
    poisoned[1, 4:, :] = float("nan")
    poisoned[1, :, 2:] = float("inf")
    value, grad = _value_and_grad(poisoned, 0.1, lx, ly, None, "cuda")
    clean, _ = _value_and_grad(cost, 0.1, lx, ly, None, "cuda")
    torch.testing.assert_close(value, clean, rtol=0, atol=0)
    assert torch.isfinite(grad).all()
    assert grad[1, 4:, :].abs().sum() == 0 and grad[1, :, 2:].abs().sum() == 0


def _check_thin_grids() -> None:
    cost, _, _ = random_batch(4, 5, 6, seed=13, dtype=torch.float32)
    lx, ly = torch.tensor([1, 1, 5, 2]), torch.tensor([1, 6, 1, 2])
    got_v, got_g = _value_and_grad(cost, 0.3, lx, ly, None, "cuda")
    want_v, want_g = naive_batch(cost, 0.3, lx, ly)
    _close(got_v, want_v, VALUE_RTOL, 1e-6)
    _close(got_g, want_g, 0, 1e-6)


def _check_divergence_three_groups() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, 5, generator=gen)
    y = torch.randn(3, 6, 5, generator=gen)
    lx, ly = torch.tensor([7, 5, 3]), torch.tensor([6, 6, 1])
    band = random_band(3, 7, 6, seed=9)
    results = []
    for impl, dtype in (("cuda", torch.float32), ("reference", torch.float64)):
        xl, yl = x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)
        value = soft_dtw_divergence(xl, yl, 0.1, lx, ly, band=band, impl=impl)
        gx, gy = torch.autograd.grad(value.sum(), (xl, yl))
        results.append((value.detach(), gx, gy))
    (v, gx, gy), (rv, rgx, rgy) = results
    _close(v, rv, VALUE_RTOL, 1e-5)
    _close(gx, rgx, 0, 1e-4)  # chain rule through cosine_cost: gradients of order 1
    _close(gy, rgy, 0, 1e-4)
    # one launch of 3·batch tasks equals three separate calls (band on the cross term only)
    cross = soft_dtw(cosine_cost(x, y), 0.1, lx, ly, band=band, impl="cuda")
    sx = soft_dtw(cosine_cost(x, x), 0.1, lx, lx, impl="cuda")
    sy = soft_dtw(cosine_cost(y, y), 0.1, ly, ly, impl="cuda")
    torch.testing.assert_close(v, (cross - 0.5 * (sx + sy)).detach(), rtol=0, atol=1e-6)


def _check_chunked_longer_than_block() -> None:
    from dwakd.ops.soft_dtw import cuda

    cost, lx, ly = random_batch(2, 24, 21, seed=31, dtype=torch.float32)
    lx[1], ly[1] = 17, 20
    band = random_band(2, 24, 21, seed=31)
    saved = cuda._SINGLE_MAX_ROWS, cuda._CHUNK_BLOCK
    try:
        cuda._SINGLE_MAX_ROWS, cuda._CHUNK_BLOCK = 0, 16  # diagonals of up to 21 cells in chunks of 16: 1–2 chunks
        assert cuda._launch_config(24)[:2] == (16, False)
        chunk_v, chunk_g = _value_and_grad(cost, 0.1, lx, ly, band, "cuda")
    finally:
        cuda._SINGLE_MAX_ROWS, cuda._CHUNK_BLOCK = saved
    single_v, single_g = _value_and_grad(cost, 0.1, lx, ly, band, "cuda")
    want_v, want_g = _value_and_grad(cost.double(), 0.1, lx, ly, band, "reference")
    _close(chunk_v, want_v, VALUE_RTOL, 1e-5)
    _close(chunk_g, want_g, 0, GRAD_ATOL)
    # the two sweep variants do the same float32 operations in the same order
    torch.testing.assert_close(chunk_v, single_v, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunk_g, single_g, rtol=0, atol=1e-6)


def _check_band_matches_dense_penalty() -> None:
    cost, lx, ly = random_batch(2, 12, 10, seed=40, dtype=torch.float32)
    center = torch.tensor([[3.0] * 12, [0.0] * 12], dtype=torch.float32)
    width = torch.tensor([[2.0] * 12, [1.0] * 12], dtype=torch.float32)  # ties |j − c| = w are inside the band
    width[0, 3] = float("nan")  # NaN compares false: no penalty on that row, as in SoftBand.outside
    band = SoftBand(center, width, penalty=2.5)
    got, _ = _value_and_grad(cost, 0.1, lx, ly, band, "cuda")
    dense, _ = _value_and_grad(band.apply(cost), 0.1, lx, ly, None, "cuda")
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-6)


def _check_auto_self_check_passes() -> None:
    """The one-time check `impl="auto"` runs before trusting the kernels passes on a correct kernel."""
    from dwakd.ops.soft_dtw import functional

    assert functional._self_check(torch.device("cpu"))


INTERPRETER_CHECKS: dict[str, Callable[[], None]] = {
    **{f"ragged_gamma{g}_{'banded' if b else 'plain'}": _check_ragged(g, b) for g in (1.0, 0.1, 0.01)
       for b in (False, True)},
    **{f"bf16_{'banded' if b else 'plain'}": _check_bf16(b) for b in (False, True)},
    "naive_loops": _check_naive_loops,
    "grad_output_scaling": _check_grad_output_scaling,
    "padding_never_leaks": _check_padding_never_leaks,
    "thin_grids": _check_thin_grids,
    "divergence_three_groups": _check_divergence_three_groups,
    "chunked_longer_than_block": _check_chunked_longer_than_block,
    "band_matches_dense_penalty": _check_band_matches_dense_penalty,
    "auto_self_check_passes": _check_auto_self_check_passes,
}  # fmt: skip


def _run_child() -> None:
    """Child entry point: run every interpreter check, print {name: null | traceback} as one JSON line."""
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy overflows in masked-off lanes
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    for name, check in INTERPRETER_CHECKS.items():
        started = time.perf_counter()
        try:
            check()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    """Run all interpreter checks once in a child process with TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import dwakd

    src = str(Path(dwakd.__file__).resolve().parents[1])
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([src, tests]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG], env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", list(INTERPRETER_CHECKS))
def test_triton_interpreter(name: str, interpreter_results: dict[str, str | None]) -> None:
    error = interpreter_results.get(name, "check did not run")
    if error is not None:
        pytest.fail(f"interpreter check {name} failed:\n{error}")


# ---------------------------------------------------------------------------------------------------------------
# Dispatch (no Triton needed) and compilation for real GPUs (Triton needed, no GPU)


def test_dispatch_auto_and_errors(monkeypatch) -> None:
    from dwakd.ops.soft_dtw import functional
    from dwakd.ops.soft_dtw.functional import _resolve_impl

    cuda_dev = torch.device("cuda")
    monkeypatch.setitem(functional._VERIFIED, "cuda", True)  # as if the kernels passed their self-check here
    assert _resolve_impl("auto", cuda_dev, torch.float32) == ("cuda" if triton_available() else "reference")
    assert _resolve_impl("auto", cuda_dev, torch.bfloat16) == ("cuda" if triton_available() else "reference")
    assert _resolve_impl("auto", cuda_dev, torch.float64) == "reference"  # Triton computes in float32
    assert _resolve_impl("auto", torch.device("cpu"), torch.float32) == "cpu"
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        cost, lx, ly = random_batch(2, 5, 4, seed=1, dtype=torch.float32)
        with pytest.raises(NotImplementedError, match="impl='cpu'"):
            soft_dtw(cost, 0.1, lx, ly, impl="cuda")


def test_auto_distrusts_a_kernel_that_fails_its_self_check(monkeypatch) -> None:
    """A kernel that disagrees with the reference (or raises) is never picked by impl="auto"."""
    from dwakd.ops.soft_dtw import functional

    real = functional._run_groups

    def skewed(path, costs, lengths, gamma, band):  # a "cuda" path that is 1 % off, run on CPU tensors
        values = real("reference", costs, lengths, gamma, band)
        return tuple(v * 1.01 for v in values) if path == "cuda" else values

    monkeypatch.setattr(functional, "_run_groups", skewed)
    with pytest.warns(RuntimeWarning, match="self-check"):
        assert not functional._self_check(torch.device("cpu"))
    def raising(path, *args):  # a "cuda" path that fails to compile or launch
        if path == "cuda":
            raise RuntimeError("boom")
        return real(path, *args)

    monkeypatch.setattr(functional, "_run_groups", raising)
    with pytest.warns(RuntimeWarning, match="RuntimeError: boom"):
        assert not functional._self_check(torch.device("cpu"))
    monkeypatch.setattr(functional, "_run_groups", real)
    monkeypatch.setattr(functional, "_self_check", lambda device: False)
    monkeypatch.delitem(functional._VERIFIED, "cuda", raising=False)
    if triton_available():
        assert functional._resolve_impl("auto", torch.device("cuda"), torch.float32) == "reference"
    monkeypatch.setattr(functional, "_self_check", lambda device: True)
    functional._VERIFIED.pop("cuda", None)
    if triton_available():
        assert functional._resolve_impl("auto", torch.device("cuda"), torch.float32) == "cuda"
    functional._VERIFIED.pop("cuda", None)


def test_batch_lengths_share_one_compiled_variant() -> None:
    """What Triton specialises the sweeps on — the constexprs and whether each integer argument is divisible by 16 —
    is the same for every batch whose widest task falls in one power-of-two bucket: the scratch strides are rounded
    to multiples of 16 (unrounded, these lengths gave two variants of each sweep kernel, and up to four in general)."""
    from dwakd.ops.soft_dtw.cuda import _plan

    keys = set()
    for n in range(65, 129):
        m = 193 - n  # both sides vary, the widest side stays in (64, 128]
        lengths = (torch.tensor([n, n - 1]), torch.tensor([m, m - 2]))
        plan = _plan([(2, n, m), (2, n, n), (2, m, m)], [lengths] * 3, torch.device("cpu"))
        assert plan.ring_row >= n + 2 and plan.delta_stride >= n + m + 3
        keys.add((plan.block, plan.single, plan.num_warps, plan.ring_row % 16 == 0, plan.delta_stride % 16 == 0))
    assert keys == {(128, True, 1, True, True)}, keys


def test_kernels_compile_for_sm80_and_sm90() -> None:
    import re

    skip_unless_aot_compile()
    from dwakd.ops.soft_dtw import _triton_kernels as k

    sweep = {"len_n": "*i32", "len_m": "*i32", "s_off": "*i64", "buf": "*fp32", "sbuf": "*fp32", "cbuf": "*fp32",
             "ring": "*fp32", "ring_row": "i32", "delta": "*fp32", "delta_stride": "i32", "values": "*fp64",
             "scale_ptr": "*fp32", "gamma": "fp32", "k": "fp32"}  # fmt: skip
    meta = {"geom": "*i64", "shape": "*i64", "group": "*i32", "sample": "*i32", "len_n": "*i32", "len_m": "*i32",
            "s_off": "*i64", "center": "*fp64", "width": "*fp64", "band_stride": "i32", "penalty": "fp32",
            "band_group": "i32", "out": "*fp32", "src": "*fp32"}  # fmt: skip
    skew = {**meta, **{f"c{i}": "*bf16" for i in range(3)}}
    unskew = {**meta, **{f"g{i}": "*bf16" for i in range(3)}}
    for arch in (80, 90):
        for single, block, warps in ((True, 512, 4), (False, 1024, 8)):
            for kernel in (k.soft_dtw_fwd_kernel, k.soft_dtw_bwd_kernel):
                ptx = compile_kernel(kernel, sweep, {"BLOCK": block, "SINGLE": single}, arch, warps).asm["ptx"]
                assert len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)) == 1  # one barrier per diagonal
                assert "ld.global.nc" not in ptx  # ring reads must see other lanes' writes (no read-only path)
        compile_kernel(k.skew_cost_kernel, skew, {"BLOCK_R": 8, "BLOCK_J": 128, "BANDED": True}, arch, 4)
        compile_kernel(k.unskew_grad_kernel, unskew, {"BLOCK_R": 8, "BLOCK_J": 128}, arch, 4)


# ---------------------------------------------------------------------------------------------------------------
# Real kernels on CUDA


def _gpu_ready() -> bool:
    return torch.cuda.is_available() and HAS_TRITON


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and triton")


@gpu
@needs_gpu
@pytest.mark.parametrize(("length", "grad_atol"), [(512, 1e-3), (2048, 2e-3)])
def test_gpu_matches_float64_cpu_path(length: int, grad_atol: float) -> None:
    batch = 8 if length == 512 else 2
    cost, lx, ly = random_batch(batch, length, length, seed=length, dtype=torch.float32)
    band = random_band(batch, length, length, seed=length) if length == 512 else None
    got_v, got_g = _value_and_grad(cost.cuda(), 0.01, lx.cuda(), ly.cuda(), band, "cuda")
    assert got_v.is_cuda and got_g.is_cuda
    assert torch.isfinite(got_v).all() and torch.isfinite(got_g).all()
    with torch_threads(max(1, os.cpu_count() or 1)):
        want_v, want_g = _value_and_grad(cost.double(), 0.01, lx, ly, band, "cpu")
    _close(got_v.cpu(), want_v, VALUE_RTOL, 1e-4)
    _close(got_g.cpu(), want_g, 0, grad_atol)


@gpu
@needs_gpu
def test_gpu_auto_bf16_and_chunked() -> None:
    from dwakd.ops.soft_dtw import cuda

    cost, lx, ly = random_batch(8, 512, 512, seed=3, dtype=torch.float32)
    low = cost.to(torch.bfloat16).cuda()
    got_v, got_g = _value_and_grad(low, 0.01, lx.cuda(), ly.cuda(), None, "auto")  # auto → cuda
    assert got_v.dtype == torch.bfloat16 and got_g.dtype == torch.bfloat16
    with torch_threads(max(1, os.cpu_count() or 1)):
        want_v, want_g = _value_and_grad(low.cpu().double(), 0.01, lx, ly, None, "cpu")
    _close(got_v.cpu(), want_v, BF16_TOL, 0)
    _close(got_g.cpu(), want_g, 0, BF16_TOL)
    # the chunked sweep (rows > BLOCK) compiled for the GPU agrees with the one-row-per-lane sweep
    small = cost[:, :300, :300].cuda()
    lx2, ly2 = lx.clamp(max=300).cuda(), ly.clamp(max=300).cuda()
    single_v, single_g = _value_and_grad(small, 0.1, lx2, ly2, None, "cuda")
    saved = cuda._SINGLE_MAX_ROWS, cuda._CHUNK_BLOCK
    try:
        cuda._SINGLE_MAX_ROWS, cuda._CHUNK_BLOCK = 0, 128
        chunk_v, chunk_g = _value_and_grad(small, 0.1, lx2, ly2, None, "cuda")
    finally:
        cuda._SINGLE_MAX_ROWS, cuda._CHUNK_BLOCK = saved
    _close(chunk_v, single_v, 1e-6, 1e-5)
    _close(chunk_g, single_g, 0, 1e-5)


@gpu
@needs_gpu
def test_gpu_divergence_matches_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 512, 64, generator=gen), torch.randn(8, 480, 64, generator=gen)
    lx = torch.randint(200, 513, (8,), generator=gen)
    ly = torch.randint(200, 481, (8,), generator=gen)
    band = random_band(8, 512, 480, seed=5)
    results = []
    for device, dtype, impl in (("cuda", torch.float32, "cuda"), ("cpu", torch.float64, "cpu")):
        xl = x.to(device, dtype).requires_grad_(True)
        yl = y.to(device, dtype).requires_grad_(True)
        value = soft_dtw_divergence(xl, yl, 0.01, lx.to(device), ly.to(device), band=band, impl=impl)
        gx, gy = torch.autograd.grad(value.sum(), (xl, yl))
        results.append([t.detach().cpu().double() for t in (value, gx, gy)])
    (v, gx, gy), (rv, rgx, rgy) = results
    assert all(torch.isfinite(t).all() for t in (v, gx, gy))
    _close(v, rv, VALUE_RTOL, 1e-3)
    _close(gx, rgx, 1e-3, 1e-3)
    _close(gy, rgy, 1e-3, 1e-3)


if __name__ == "__main__" and CHILD_FLAG in sys.argv:
    _run_child()
