"""The fast CPU Soft-DTW path against the float64 PyTorch reference, naive loops and gradcheck.

Tolerances: float64 path 1e-9 (same maths, libm exp/log); float32 path ≤ 2e-5 relative on values and 2e-5
absolute on gradients (gradients are alignment probabilities in [0, 1]); R is accumulated in float64 in both.
The symmetric half-grid sweep of the divergence's self terms, the strip-skewed cost/gradient layout (16-row strips:
lengths around multiples of 16 matter) and the forward-only path are each checked against an independent reference.
First use compiles the numba kernels (≈ 1 min on the shared 2-core machine, then cached on disk).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from _soft_dtw_helpers import (
    diagonal_band,
    naive_batch,
    naive_soft_dtw_on_band,
    random_band,
    random_batch,
    torch_threads,
)

from dwakd.ops.soft_dtw import SoftBand, cosine_cost, soft_dtw, soft_dtw_divergence
from dwakd.ops.soft_dtw.cpu import soft_dtw_cpu_groups

F32_VALUE_RTOL = 2e-5
F32_GRAD_ATOL = 2e-5


def _value_and_grad(cost: torch.Tensor, gamma: float, lx, ly, band, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """soft_dtw value (batch,) and d(sum)/d cost (batch, N, M) on one path."""
    leaf = cost.detach().clone().requires_grad_(True)
    value = soft_dtw(leaf, gamma, lx, ly, band=band, impl=impl)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread for the reference's many small ops (tests that need more set it themselves)."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("gamma", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("banded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_matches_reference_ragged(gamma: float, banded: bool, dtype: torch.dtype) -> None:
    cost, lx, ly = random_batch(6, 23, 17, seed=int(1000 * gamma) + 7 * banded, dtype=dtype)
    band = random_band(6, 23, 17, seed=5, penalty=1.0) if banded else None
    got_v, got_g = _value_and_grad(cost, gamma, lx, ly, band, "cpu")
    want_v, want_g = _value_and_grad(cost.double(), gamma, lx, ly, band, "reference")
    assert got_v.dtype == dtype and got_g.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-10)
    else:
        torch.testing.assert_close(got_v.double(), want_v, rtol=F32_VALUE_RTOL, atol=1e-5)
        torch.testing.assert_close(got_g.double(), want_g, rtol=0, atol=F32_GRAD_ATOL)


@pytest.mark.parametrize("gamma", [0.5, 0.01])
def test_cpu_matches_naive_loops(gamma: float) -> None:
    cost, lx, ly = random_batch(3, 8, 11, seed=3)
    band = random_band(3, 8, 11, seed=3, penalty=0.7)
    got_v, got_g = _value_and_grad(cost, gamma, lx, ly, band, "cpu")
    want_v, want_g = naive_batch(cost, gamma, lx, ly, band)
    torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_g, want_g, rtol=1e-8, atol=1e-10)


def test_cpu_gradcheck_float64() -> None:
    cost, lx, ly = random_batch(3, 6, 5, seed=21)
    band = random_band(3, 6, 5, seed=21, penalty=0.4)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.2, lx, ly, band=band, impl="cpu"), (cost,))
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.05, lx, ly, impl="cpu"), (cost,))


def test_cpu_padding_never_leaks() -> None:
    cost, lx, ly = random_batch(3, 9, 7, seed=8, dtype=torch.float32)
    lx[1], ly[1] = 4, 2
    poisoned = cost.clone()
    poisoned[1, 4:, :] = float("nan")
    poisoned[1, :, 2:] = float("inf")
    value, grad = _value_and_grad(poisoned, 0.1, lx, ly, None, "cpu")
    clean, _ = _value_and_grad(cost, 0.1, lx, ly, None, "cpu")
    torch.testing.assert_close(value, clean, rtol=0, atol=0)
    assert torch.isfinite(grad).all()
    assert grad[1, 4:, :].abs().sum() == 0 and grad[1, :, 2:].abs().sum() == 0


def test_cpu_single_cells_and_thin_grids() -> None:
    cost, _, _ = random_batch(4, 5, 6, seed=13)
    lx, ly = torch.tensor([1, 1, 5, 2]), torch.tensor([1, 6, 1, 2])
    got_v, got_g = _value_and_grad(cost, 0.3, lx, ly, None, "cpu")
    want_v, want_g = naive_batch(cost, 0.3, lx, ly)
    torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)


def test_cpu_unequal_lengths_larger_batch_float32() -> None:
    cost, lx, ly = random_batch(5, 96, 130, seed=17, dtype=torch.float32)
    band = random_band(5, 96, 130, seed=17)
    got_v, got_g = _value_and_grad(cost, 0.01, lx, ly, band, "cpu")
    want_v, want_g = _value_and_grad(cost.double(), 0.01, lx, ly, band, "reference")
    torch.testing.assert_close(got_v.double(), want_v, rtol=F32_VALUE_RTOL, atol=1e-4)
    torch.testing.assert_close(got_g.double(), want_g, rtol=0, atol=F32_GRAD_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_length_2048_matches_float64_loop_on_a_band(dtype: torch.dtype) -> None:
    # independent reference at the longest length: float64 path sums over the band's cells only (O(n·w) steps);
    # a penalty ρ = 1e3 ≫ γ outside the band makes the kernel's soft band a hard one
    n_rows, n_cols, half_width, gamma = 2048, 1536, 5, 0.01
    cost, lx, ly = random_batch(1, n_rows, n_cols, seed=4, dtype=dtype, ragged=False)
    band = diagonal_band(1, n_rows, n_cols, half_width, penalty=1e3)
    got_v, got_g = _value_and_grad(cost, gamma, lx, ly, band, "cpu")
    want_v, want_g = naive_soft_dtw_on_band(cost[0].double().numpy(), gamma, half_width)
    assert torch.isfinite(got_v).all() and torch.isfinite(got_g).all()
    value_rtol, grad_atol = (F32_VALUE_RTOL, F32_GRAD_ATOL) if dtype == torch.float32 else (1e-10, 1e-9)
    torch.testing.assert_close(got_v.double(), torch.tensor([want_v], dtype=torch.float64), rtol=value_rtol, atol=0)
    torch.testing.assert_close(got_g[0].double(), torch.from_numpy(want_g), rtol=0, atol=grad_atol)


@pytest.mark.parametrize("gamma", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_symmetric_half_grid_matches_reference(gamma: float, dtype: torch.dtype) -> None:
    # self-term costs (symmetric, equal lengths per sample): the kernel sweeps i ≤ j only and mirrors the gradient;
    # lengths straddle the 16-row strips (1, 15, 16, 17, 33, 40)
    gen = torch.Generator().manual_seed(int(gamma * 100) + 3)
    x = torch.randn(6, 40, 5, generator=gen, dtype=torch.float64)
    cost = cosine_cost(x, x).to(dtype)
    cost = 0.5 * (cost + cost.transpose(1, 2))  # exactly symmetric in this dtype
    lengths = torch.tensor([40, 1, 15, 16, 17, 33])
    leaf = cost.clone().requires_grad_(True)
    (value,) = soft_dtw_cpu_groups([leaf], [(lengths, lengths)], gamma, symmetric=(True,))
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    want_v, want_g = _value_and_grad(cost.double(), gamma, lengths, lengths, None, "reference")
    if dtype == torch.float64:
        torch.testing.assert_close(value, want_v, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(grad, want_g, rtol=1e-9, atol=1e-10)
    else:
        torch.testing.assert_close(value.double(), want_v, rtol=F32_VALUE_RTOL, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_g, rtol=0, atol=F32_GRAD_ATOL)


def test_cpu_symmetric_flag_is_checked_and_never_assumed() -> None:
    cost, _, _ = random_batch(2, 9, 9, seed=23)  # square, equal lengths, NOT symmetric
    lengths = torch.tensor([9, 7])
    with pytest.raises(ValueError, match="lengths differ"):
        soft_dtw_cpu_groups([cost], [(lengths, torch.tensor([9, 6]))], 0.1, symmetric=(True,))
    with pytest.raises(ValueError, match="not square"):
        soft_dtw_cpu_groups([cost[:, :, :8]], [(lengths, torch.tensor([8, 7]))], 0.1, symmetric=(True,))
    # the public function computes the full grid: it must match the loops on a square non-symmetric cost
    got_v, got_g = _value_and_grad(cost, 0.1, lengths, lengths, None, "cpu")
    want_v, want_g = naive_batch(cost, 0.1, lengths, lengths)
    torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_g, want_g, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 1), (1, 20), (20, 1), (15, 16), (16, 15), (16, 16), (17, 33), (33, 17)])
def test_cpu_strip_edges_match_naive_loops(shape: tuple[int, int]) -> None:
    n_rows, n_cols = shape
    cost, _, _ = random_batch(2, n_rows, n_cols, seed=n_rows * 100 + n_cols, ragged=False)
    lx, ly = torch.tensor([n_rows, max(1, n_rows - 1)]), torch.tensor([n_cols, max(1, n_cols - 2)])
    band = random_band(2, n_rows, n_cols, seed=n_cols, penalty=0.5)
    got_v, got_g = _value_and_grad(cost, 0.05, lx, ly, band, "cpu")
    want_v, want_g = naive_batch(cost, 0.05, lx, ly, band)
    torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_g, want_g, rtol=1e-8, atol=1e-10)


def test_cpu_uninitialised_workspace_never_leaks(monkeypatch) -> None:
    # the weight workspace is np.empty (reused heap memory): fill it with NaN instead, and every ragged, symmetric or
    # strip-edge case must still match the loops (a slot read before it is written would turn gradients into NaN)
    import numpy as np

    from dwakd.ops.soft_dtw import cpu

    monkeypatch.setattr(cpu, "_new_workspace", lambda shape, dtype: np.full(shape, np.nan, dtype=dtype))
    for n_rows, n_cols in ((16, 15), (17, 33), (1, 7), (40, 40)):
        cost, _, _ = random_batch(3, n_rows, n_cols, seed=n_rows + n_cols, ragged=False)
        lx = torch.tensor([n_rows, max(1, n_rows // 2), 1])
        ly = torch.tensor([n_cols, max(1, n_cols - 3), max(1, n_cols // 3)])
        got_v, got_g = _value_and_grad(cost, 0.1, lx, ly, None, "cpu")
        want_v, want_g = naive_batch(cost, 0.1, lx, ly)
        torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_g, want_g, rtol=1e-8, atol=1e-10)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 33, 4, generator=gen, dtype=torch.float64)
    cost = cosine_cost(x, x)
    lengths = torch.tensor([33, 16, 17])
    leaf = cost.clone().requires_grad_(True)
    (value,) = soft_dtw_cpu_groups([leaf], [(lengths, lengths)], 0.1, symmetric=(True,))
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    want_v, want_g = naive_batch(cost, 0.1, lengths, lengths)
    torch.testing.assert_close(value, want_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, want_g, rtol=1e-8, atol=1e-10)


def test_cpu_forward_only_call_gives_the_same_values() -> None:
    # without a gradient the forward skips the softmin weights: same values bit for bit, for one batch and the
    # divergence's three (symmetric self terms included)
    cost, lx, ly = random_batch(5, 40, 35, seed=19, dtype=torch.float32)
    band = random_band(5, 40, 35, seed=19)
    with torch.no_grad():
        plain = soft_dtw(cost, 0.1, lx, ly, band=band, impl="cpu")
    graded = soft_dtw(cost.clone().requires_grad_(True), 0.1, lx, ly, band=band, impl="cpu")
    torch.testing.assert_close(plain, graded.detach(), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(19)
    x, y = torch.randn(3, 30, 4, generator=gen), torch.randn(3, 21, 4, generator=gen)
    with torch.no_grad():
        plain = soft_dtw_divergence(x, y, 0.1, torch.tensor([30, 17, 2]), torch.tensor([21, 21, 9]), impl="cpu")
    graded = soft_dtw_divergence(x.requires_grad_(True), y, 0.1, torch.tensor([30, 17, 2]), torch.tensor([21, 21, 9]),
                                 impl="cpu")  # fmt: skip
    torch.testing.assert_close(plain, graded.detach(), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1.0, 0.01])
def test_cpu_matches_reference_long_ragged_banded(gamma: float) -> None:
    cost, lx, ly = random_batch(2, 2048, 1536, seed=31, dtype=torch.float32)
    band = random_band(2, 2048, 1536, seed=31)
    got_v, got_g = _value_and_grad(cost, gamma, lx, ly, band, "cpu")
    want_v, want_g = _value_and_grad(cost.double(), gamma, lx, ly, band, "reference")
    assert torch.isfinite(got_g).all()
    torch.testing.assert_close(got_v.double(), want_v, rtol=F32_VALUE_RTOL, atol=1e-3)
    torch.testing.assert_close(got_g.double(), want_g, rtol=0, atol=F32_GRAD_ATOL)


def test_cpu_double_backward_pass_and_grad_scale() -> None:
    cost, lx, ly = random_batch(3, 12, 10, seed=2, dtype=torch.float32)
    leaf = cost.clone().requires_grad_(True)
    value = soft_dtw(leaf, 0.1, lx, ly, impl="cpu")
    weights = torch.tensor([2.0, -1.0, 0.5])
    (g1,) = torch.autograd.grad((value * weights).sum(), leaf, retain_graph=True)
    (g2,) = torch.autograd.grad((value * weights).sum(), leaf)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    _, plain = _value_and_grad(cost, 0.1, lx, ly, None, "cpu")
    torch.testing.assert_close(g1, plain * weights.view(-1, 1, 1), rtol=1e-6, atol=1e-7)


def test_cpu_result_independent_of_thread_count() -> None:
    # threads pull chunks of tasks (with a gradient: each with its own weight workspace); forward-only calls too
    cost, lx, ly = random_batch(7, 120, 100, seed=12, dtype=torch.float32, ragged=False)
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(5, 90, 6, generator=gen), torch.randn(5, 70, 6, generator=gen)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            value, grad = _value_and_grad(cost, 0.1, lx, ly, None, "cpu")
            with torch.no_grad():
                plain = soft_dtw(cost, 0.1, lx, ly, impl="cpu")
                divergence = soft_dtw_divergence(x, y, 0.1, impl="cpu")
            results.append((value, grad, plain, divergence))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_cpu_bfloat16_costs_computed_in_float32() -> None:
    cost, lx, ly = random_batch(2, 20, 16, seed=6, dtype=torch.float32)
    low = cost.to(torch.bfloat16)
    value, grad = _value_and_grad(low, 0.1, lx, ly, None, "cpu")
    want_v, want_g = _value_and_grad(low.double(), 0.1, lx, ly, None, "reference")
    assert value.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value.double(), want_v, rtol=1e-2, atol=0)
    torch.testing.assert_close(grad.double(), want_g, rtol=0, atol=1e-2)


@pytest.mark.parametrize("gamma", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("banded", [False, True])
def test_cpu_divergence_matches_reference(banded: bool, gamma: float) -> None:
    # the cross term (14×11, not symmetric) and the two self terms (symmetric half-grid sweeps, ragged lengths)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 14, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 11, 6, generator=gen, dtype=torch.float64)
    lx, ly = torch.tensor([14, 9, 3, 14]), torch.tensor([11, 11, 5, 1])
    band = random_band(4, 14, 11, seed=9) if banded else None
    grads = []
    for impl in ("cpu", "reference"):
        xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        value = soft_dtw_divergence(xl, yl, gamma, lx, ly, band=band, impl=impl)
        gx, gy = torch.autograd.grad(value.sum(), (xl, yl))
        grads.append((value.detach(), gx, gy))
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cpu_divergence_float32_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(3, 37, 8, generator=gen), torch.randn(3, 33, 8, generator=gen)
    lx, ly = torch.tensor([37, 16, 17]), torch.tensor([33, 33, 1])
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    got = soft_dtw_divergence(xl, yl, 0.01, lx, ly, impl="cpu")
    gx, gy = torch.autograd.grad(got.sum(), (xl, yl))
    xr, yr = x.double().requires_grad_(True), y.double().requires_grad_(True)
    want = soft_dtw_divergence(xr, yr, 0.01, lx, ly, impl="reference")
    wx, wy = torch.autograd.grad(want.sum(), (xr, yr))
    torch.testing.assert_close(got.double(), want, rtol=F32_VALUE_RTOL, atol=1e-4)
    # gradients w.r.t. the inputs go through the cosine cost's backward: absolute tolerance scaled accordingly
    torch.testing.assert_close(gx.double(), wx, rtol=0, atol=1e-4)
    torch.testing.assert_close(gy.double(), wy, rtol=0, atol=1e-4)


def test_divergence_float32_batched_equals_three_calls() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 20, 8, generator=gen), torch.randn(3, 17, 8, generator=gen)
    lx, ly = torch.tensor([20, 12, 5]), torch.tensor([9, 17, 17])
    band = random_band(3, 20, 17, seed=4)
    got = soft_dtw_divergence(x, y, 0.05, lx, ly, band=band, impl="cpu")
    cross = soft_dtw(cosine_cost(x, y), 0.05, lx, ly, band=band, impl="cpu")
    sx = soft_dtw(cosine_cost(x, x), 0.05, lx, lx, impl="cpu")
    sy = soft_dtw(cosine_cost(y, y), 0.05, ly, ly, impl="cpu")
    torch.testing.assert_close(got, cross - 0.5 * (sx + sy), rtol=0, atol=0)


def test_auto_picks_cpu_and_cuda_hook_raises() -> None:
    cost, lx, ly = random_batch(2, 6, 6, seed=1)
    auto, _ = _value_and_grad(cost, 0.1, lx, ly, None, "auto")
    cpu, _ = _value_and_grad(cost, 0.1, lx, ly, None, "cpu")
    torch.testing.assert_close(auto, cpu, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="impl='cpu'"):
        soft_dtw(cost, 0.1, impl="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_path_accepts_cuda_tensors() -> None:
    cost, lx, ly = random_batch(3, 30, 25, seed=5, dtype=torch.float32)
    got_v, got_g = _value_and_grad(cost.cuda(), 0.1, lx.cuda(), ly.cuda(), None, "cpu")
    want_v, want_g = _value_and_grad(cost, 0.1, lx, ly, None, "cpu")
    assert got_v.is_cuda and got_g.is_cuda
    torch.testing.assert_close(got_v.cpu(), want_v)
    torch.testing.assert_close(got_g.cpu(), want_g)


def test_cpu_backward_scales_in_place_only_when_the_graph_is_not_kept() -> None:
    # Without retain_graph the backward hands out E scaled in place (no second B × N × M array); with it, E must
    # survive for the next backward: two backwards of 2·Σ value through a kept graph give the same gradient, and
    # both equal the loops' gradient times 2 (an in-place scale on a kept graph would give 4× on the second)
    cost, lx, ly = random_batch(3, 17, 13, seed=12)
    want_v, want_g = naive_batch(cost, 0.1, lx, ly)
    leaf = cost.clone().requires_grad_(True)
    value = soft_dtw(leaf, 0.1, lx, ly, impl="cpu")
    loss = 2 * value.sum()
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (last,) = torch.autograd.grad(loss, leaf)  # graph freed: this one may scale E in place
    for grad in (first, second, last):
        torch.testing.assert_close(grad, 2 * want_g, rtol=1e-8, atol=1e-10)
    with pytest.raises(RuntimeError, match="backward|graph"):
        torch.autograd.grad(loss, leaf)
    # the usual single backward (in place) also matches
    leaf.grad = None
    (3 * soft_dtw(leaf, 0.1, lx, ly, impl="cpu")).sum().backward()
    torch.testing.assert_close(leaf.grad, 3 * want_g, rtol=1e-8, atol=1e-10)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"),
                    reason="the kernel flushes subnormals through x86's MXCSR only")
def test_cpu_gradient_has_no_subnormals_and_the_callers_fp_mode_is_kept() -> None:
    # Far from the alignment path E falls below float32's smallest normal; the kernel flushes such values to zero
    # (an operation on a subnormal costs a microcode assist, here and in the caller's matmuls on E) and must restore
    # the calling thread's floating-point mode: NumPy in this thread still produces subnormals afterwards
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 64, 8, generator=gen), torch.randn(2, 64, 8, generator=gen)
    cost = cosine_cost(x, y).requires_grad_(True)
    (grad,) = torch.autograd.grad(soft_dtw(cost, 0.05, impl="cpu").sum(), cost)
    tiny = torch.finfo(torch.float32).tiny
    assert int(((grad != 0) & (grad.abs() < tiny)).sum()) == 0  # 327 of them without the flush
    want_v, want_g = naive_batch(cost.detach().double(), 0.05, torch.tensor([64, 64]), torch.tensor([64, 64]))
    torch.testing.assert_close(grad.double(), want_g, rtol=1e-4, atol=1e-6)
    assert np.float32(1e-38) * np.float32(0.25) > 0  # a subnormal result, not flushed in the caller's thread
    assert np.float32(2e-39) + np.float32(0) > 0  # a subnormal input, not treated as zero


def test_soft_band_is_applied_inside_kernel_like_dense_penalty() -> None:
    cost, lx, ly = random_batch(2, 15, 12, seed=40, dtype=torch.float32)
    center = torch.tensor([[3.5] * 15, [0.0] * 15], dtype=torch.float32)
    width = torch.tensor([[2.0] * 15, [0.5] * 15], dtype=torch.float32)
    band = SoftBand(center, width, penalty=2.5)
    got, _ = _value_and_grad(cost, 0.1, lx, ly, band, "cpu")
    dense, _ = _value_and_grad(band.apply(cost), 0.1, lx, ly, None, "cpu")
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6)


def test_float32_exp2_and_log2_kernels_meet_their_documented_error() -> None:
    # the polynomial 2^t (t ≤ 0) and log2 (s ∈ [1, 3]) of the float32 softmin against float64 NumPy, on a dense grid
    import numpy as np
    from numba import njit

    from dwakd.ops.soft_dtw import _cpu_kernels as kernels

    @njit
    def run(t, s, exp_out, log_out):  # pragma: no cover - compiled
        for k in range(t.shape[0]):
            exp_out[k] = kernels._exp2_nonpos_f32(t[k])
            log_out[k] = kernels._log2_pos_f32(s[k])

    t = -np.linspace(0.0, 124.0, 400_001).astype(np.float32)
    s = np.linspace(1.0, 3.0, 400_001).astype(np.float32)
    exp_out, log_out = np.empty_like(t), np.empty_like(s)
    run(t, s, exp_out, log_out)
    want_exp = np.exp2(t.astype(np.float64))
    assert (np.abs(exp_out - want_exp) / want_exp).max() <= 2.5e-7
    assert np.abs(log_out - np.log2(s.astype(np.float64))).max() <= 2e-7


def test_cpu_buffers_are_reused_between_calls_and_the_gradient_comes_back_when_freed() -> None:
    # The work buffers and E (lent out as the gradient) come from a pool: a call made after the previous call's
    # gradient was freed reads the same memory again instead of page-faulting in fresh memory
    from dwakd.ops.soft_dtw import cpu

    cost, lx, ly = random_batch(2, 40, 40, seed=5, dtype=torch.float32)
    leaf = cost.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(soft_dtw(leaf, 0.1, lx, ly, impl="cpu").sum(), leaf)
    address, want = first.data_ptr(), first.clone()
    kept = cpu._BUFFERS._free.get(np.dtype(np.float32), [])
    assert all(b.ctypes.data != address for b in kept)  # lent out while the gradient lives
    del first
    assert any(b.ctypes.data == address for b in kept)  # back in the pool once it is freed
    pooled = {b.ctypes.data for b in kept}
    (second,) = torch.autograd.grad(soft_dtw(leaf, 0.1, lx, ly, impl="cpu").sum(), leaf)
    assert second.data_ptr() in pooled  # pooled memory (the pool keeps several buffers that fit), none fresh
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    assert sum(b.nbytes for b in kept) <= cpu._BufferPool.MAX_BYTES and len(kept) <= cpu._BufferPool.KEEP
