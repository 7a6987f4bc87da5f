"""The fused CPU Soft-DTW divergence and the sparse expected alignments it is built on.

On the CPU, `soft_dtw_divergence` runs its costs, DPs and gradient in one autograd node
(`ops.soft_dtw.cpu.cosine_divergence_cpu`): the backward goes from E = dR/dC straight to the unit vectors, over each
row's span of nonzero E when those are narrow (`alignment_products`) and as BLAS products otherwise. The kernels
find those spans while computing E: far from the alignment path E underflows to exactly zero in float32, and the
E-recursion and its un-skewing only visit the diagonals' nonzero rows. Everything here is checked against the
float64 plain-PyTorch reference or naive loops (independent of the kernels), with both product paths forced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _soft_dtw_helpers import naive_batch, random_band, torch_threads

from dwakd.ops.soft_dtw import cosine_cost, soft_dtw, soft_dtw_divergence
from dwakd.ops.soft_dtw import cpu as soft_dtw_cpu


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


def smooth_pair(batch: int, n: int, m: int, dim: int, seed: int, dtype=torch.float32):
    """Random-walk sequences (neighbouring states correlated, as hidden states are) and a noisy copy of the first
    stretched to length m: the alignment is a narrow band, so E is mostly exact zeros at a small γ in float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cumsum(torch.randn(batch, n, dim, generator=gen, dtype=torch.float64), dim=1) / n**0.5
    idx = torch.linspace(0, n - 1, m).round().long()
    y = x[:, idx] + 0.3 * torch.randn(batch, m, dim, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _divergence_and_grads(x, y, gamma, lx, ly, band, impl):
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    value = soft_dtw_divergence(xl, yl, gamma, lx, ly, band=band, impl=impl)
    # unequal weights per sample: the backward's per-sample coefficients are exercised
    weights = torch.linspace(0.5, 2.0, value.shape[0], dtype=value.dtype)
    gx, gy = torch.autograd.grad((value * weights).sum(), (xl, yl))
    return value.detach(), gx, gy


@pytest.mark.parametrize("products", ["banded", "dense"])
@pytest.mark.parametrize("gamma", [1.0, 0.05])
@pytest.mark.parametrize("banded", [False, True])
def test_fused_divergence_matches_float64_reference(products, gamma, banded, monkeypatch) -> None:
    monkeypatch.setattr(soft_dtw_cpu, "BANDED_MAX_FRACTION", 1.0 if products == "banded" else 0.0)
    x, y = smooth_pair(3, 70, 53, 8, seed=int(100 * gamma) + banded)
    lx, ly = torch.tensor([70, 41, 17]), torch.tensor([53, 53, 30])  # ragged, a strip edge (16) crossed
    band = random_band(3, 70, 53, seed=3, penalty=0.5) if banded else None
    got = _divergence_and_grads(x, y, gamma, lx, ly, band, "cpu")
    want = _divergence_and_grads(x.double(), y.double(), gamma, lx, ly, band, "reference")
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-5, atol=1e-4)
    for g, w in zip(got[1:], want[1:]):
        # gradients w.r.t. the inputs go through the cosine cost's backward: absolute tolerance scaled accordingly
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-4)
    assert got[1][1, 41:].abs().sum() == 0 and got[1][2, 17:].abs().sum() == 0  # padding gets no gradient
    assert got[2][2, 30:].abs().sum() == 0


@pytest.mark.parametrize("gamma", [0.5, 0.02])
def test_fused_divergence_float64_equals_the_reference_to_rounding(gamma) -> None:
    x, y = smooth_pair(2, 40, 33, 5, seed=7, dtype=torch.float64)
    lx, ly = torch.tensor([40, 23]), torch.tensor([33, 33])
    got = _divergence_and_grads(x, y, gamma, lx, ly, None, "cpu")
    want = _divergence_and_grads(x, y, gamma, lx, ly, None, "reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_banded_and_dense_products_agree_and_auto_takes_the_band_at_small_gamma(monkeypatch) -> None:
    x, y = smooth_pair(4, 96, 96, 16, seed=11)
    lx, ly = torch.tensor([96, 80, 96, 33]), torch.tensor([96, 96, 57, 40])
    results = {}
    for products, fraction in (("banded", 1.0), ("dense", 0.0)):
        monkeypatch.setattr(soft_dtw_cpu, "BANDED_MAX_FRACTION", fraction)
        results[products] = _divergence_and_grads(x, y, 0.02, lx, ly, None, "cpu")
    torch.testing.assert_close(results["banded"][0], results["dense"][0], rtol=0, atol=0)  # same forward
    for b, d in zip(results["banded"][1:], results["dense"][1:]):
        torch.testing.assert_close(b, d, rtol=1e-5, atol=1e-6)  # summation order differs
    monkeypatch.undo()
    chosen = []
    kernel = soft_dtw_cpu._kernels().alignment_products
    monkeypatch.setattr(soft_dtw_cpu, "_kernels", lambda: _Spy(kernel, chosen))
    _divergence_and_grads(x, y, 0.02, lx, ly, None, "cpu")
    assert chosen, "at γ = 0.02 E's nonzero band is narrow: the banded products must be used"


class _Spy:
    """Stands in for the kernel module: records calls of `alignment_products`, passes everything else through."""

    def __init__(self, kernel, calls):
        from dwakd.ops.soft_dtw import _cpu_kernels

        self._module, self._kernel, self._calls = _cpu_kernels, kernel, calls

    def __getattr__(self, name):
        if name == "alignment_products":
            def call(*args):
                self._calls.append(1)
                return self._kernel(*args)

            return call
        return getattr(self._module, name)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gamma", [0.02, 1.0])
def test_spans_hold_every_nonzero_of_e_and_skip_the_far_cells(symmetric, gamma) -> None:
    x, y = smooth_pair(3, 90, 90 if symmetric else 71, 8, seed=5)
    if symmetric:
        cost, lengths = cosine_cost(x, x), (torch.tensor([90, 47, 16]),) * 2
    else:
        cost, lengths = cosine_cost(x, y), (torch.tensor([90, 47, 16]), torch.tensor([71, 71, 9]))
    plan = soft_dtw_cpu._plan([lengths], 1, (symmetric,))
    _, grads, spans = soft_dtw_cpu._sweep(gamma, plan, None, True, [cost])
    e, span = grads[0], spans[0]
    inside = np.zeros(e.shape, dtype=bool)
    for b in range(e.shape[0]):
        for i in range(e.shape[1]):
            inside[b, i, span[b, i, 0] : max(span[b, i, 0], span[b, i, 1])] = True
    assert not (e[~inside] != 0).any(), "a nonzero of E outside its row's span"
    n = lengths[0].numpy()
    for b in range(e.shape[0]):
        assert (span[b, n[b] :, 1] <= span[b, n[b] :, 0]).all()  # padding rows: empty
    # E itself against independent loops (float64 sums over paths, not the E-recursion)
    want_v, want_g = naive_batch(cost.double(), gamma, *lengths)
    torch.testing.assert_close(torch.from_numpy(e).double(), want_g, rtol=0, atol=2e-5)
    if gamma < 0.1:  # most of E is exactly zero there, and the spans skip most cells
        assert (e == 0).mean() > 0.5
        assert inside.mean() < 0.5


def test_fused_divergence_backward_through_a_kept_graph_twice(monkeypatch) -> None:
    x, y = smooth_pair(2, 40, 35, 6, seed=2)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    loss = 3 * soft_dtw_divergence(xl, yl, 0.05, impl="cpu").sum()
    first = torch.autograd.grad(loss, (xl, yl), retain_graph=True)
    second = torch.autograd.grad(loss, (xl, yl))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward|graph"):
        torch.autograd.grad(loss, (xl, yl))


def test_fused_divergence_one_input_with_gradient_and_forward_only_values() -> None:
    x, y = smooth_pair(2, 30, 25, 4, seed=3)
    want = _divergence_and_grads(x.double(), y.double(), 0.1, None, None, None, "reference")
    xl = x.clone().requires_grad_(True)
    value = soft_dtw_divergence(xl, y, 0.1, impl="cpu")
    weights = torch.linspace(0.5, 2.0, 2)
    (gx,) = torch.autograd.grad((value * weights).sum(), xl)
    torch.testing.assert_close(gx.double(), want[1], rtol=0, atol=1e-4)
    with torch.no_grad():
        plain = soft_dtw_divergence(x, y, 0.1, impl="cpu")
    torch.testing.assert_close(plain, value.detach(), rtol=0, atol=0)


def test_fused_path_only_where_it_applies(monkeypatch) -> None:
    # CPU float32/float64 outside autocast: fused; under bf16 autocast the costs are formed in bf16 by
    # `divergence_costs` (as before) and the reference path never takes the fused one
    calls = []
    fused = soft_dtw_cpu.cosine_divergence_cpu
    monkeypatch.setattr(soft_dtw_cpu, "cosine_divergence_cpu", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x, y = smooth_pair(2, 20, 18, 4, seed=4)
    soft_dtw_divergence(x, y, 0.1, impl="auto")
    soft_dtw_divergence(x.double(), y.double(), 0.1, impl="cpu")
    assert len(calls) == 2
    soft_dtw_divergence(x, y, 0.1, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = soft_dtw_divergence(x, y, 0.1, impl="cpu")
    assert len(calls) == 2
    torch.testing.assert_close(low.float(), soft_dtw_divergence(x, y, 0.1), rtol=0.05, atol=0.05)


def test_soft_dtw_gradient_with_sparse_e_matches_loops() -> None:
    # the plain soft_dtw path shares the restricted E-recursion: float32 at γ = 0.02, where most of E is zero
    x, y = smooth_pair(2, 64, 64, 8, seed=9)
    cost = cosine_cost(x, y)
    lx, ly = torch.tensor([64, 37]), torch.tensor([64, 50])
    leaf = cost.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft_dtw(leaf, 0.02, lx, ly, impl="cpu").sum(), leaf)
    assert (grad == 0).float().mean() > 0.5
    _, want = naive_batch(cost.double(), 0.02, lx, ly)
    torch.testing.assert_close(grad.double(), want, rtol=0, atol=2e-5)


def test_cpu_paths_refuse_a_second_derivative() -> None:
    # the CPU backward runs outside autograd: with create_graph=True the Soft-DTW part of a second derivative would be
    # silently missing (the normalisation's part alone came back before), so it raises; the reference path supports it
    x, y = smooth_pair(2, 12, 10, 4, seed=6, dtype=torch.float64)
    xl = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(soft_dtw_divergence(xl, y, 0.1, impl="cpu").sum(), xl, create_graph=True)
    cost = cosine_cost(x, y).requires_grad_(True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(soft_dtw(cost, 0.1, impl="cpu").sum(), cost, create_graph=True)
    (g,) = torch.autograd.grad(soft_dtw_divergence(xl, y, 0.1, impl="reference").sum(), xl, create_graph=True)
    g.sum().backward()
    assert torch.isfinite(xl.grad).all()


def test_unit_rows_gradient_matches_autograd_of_the_formula() -> None:
    # unit_rows' backward is one hand-written expression: gradcheck (float64), and against autograd of the plain
    # formula x·rsqrt(max(|x|², eps²)), rows just above and below the clamp included, with create_graph too
    from dwakd.ops.soft_dtw.cost import unit_rows

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    x[0, 1] = 0.0  # a zero row
    x[1, 2] *= 1e-9  # clamped (norm < eps)
    x[1, 3] = torch.tensor([1.0001e-4, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # just above the clamp
    x[1, 4] = torch.tensor([0.9999e-4, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # just below it
    eps = 1e-4  # (exactly at it the gradient is a convention: torch 2.13 passes clamp_min's, 2.14 does not)
    leaf = x.clone().requires_grad_(True)
    # finite differences only away from the clamp's kink (eps ≪ every row's norm)
    smooth = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: unit_rows(t, 1e-6), (smooth,))
    weights = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((unit_rows(leaf, eps) * weights).sum(), leaf, create_graph=True)[0]
    plain = leaf * torch.rsqrt(leaf.pow(2).sum(-1, keepdim=True).clamp_min(eps * eps))
    want = torch.autograd.grad((plain * weights).sum(), leaf, create_graph=True)[0]
    torch.testing.assert_close(unit_rows(leaf, eps), plain, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    fast = torch.autograd.grad((unit_rows(leaf, eps) * weights).sum(), leaf)[0]  # the path without create_graph
    torch.testing.assert_close(fast, want.detach(), rtol=1e-12, atol=1e-12)
    second = torch.autograd.grad(got.pow(2).sum(), leaf)[0]
    second_want = torch.autograd.grad(want.pow(2).sum(), leaf)[0]
    torch.testing.assert_close(second, second_want, rtol=1e-9, atol=1e-9)
