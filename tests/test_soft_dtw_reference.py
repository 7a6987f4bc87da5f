"""The plain-PyTorch Soft-DTW reference, cosine cost and divergence against naive float64 loops and gradcheck."""

from __future__ import annotations

import pytest
import torch
from _soft_dtw_helpers import naive_batch, random_band, random_batch, torch_threads

from dwakd.ops.soft_dtw import SoftBand, cosine_cost, soft_dtw, soft_dtw_divergence, soft_dtw_reference
from dwakd.ops.soft_dtw.cost import divergence_costs, self_cosine_cost


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread for the reference's many small ops (tests that need more set it themselves)."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("gamma", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("banded", [False, True])
def test_reference_matches_naive_loops(gamma: float, banded: bool) -> None:
    cost, lx, ly = random_batch(4, 7, 9, seed=int(gamma * 100) + banded)
    band = random_band(4, 7, 9, seed=3) if banded else None
    cost.requires_grad_(True)
    value = soft_dtw(cost, gamma, lx, ly, band=band, impl="reference")
    (grad,) = torch.autograd.grad(value.sum(), cost)
    want_value, want_grad = naive_batch(cost, gamma, lx, ly, band)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-10)


def test_reference_gradcheck_float64() -> None:
    cost, lx, ly = random_batch(3, 5, 6, seed=11)
    band = random_band(3, 5, 6, seed=11, penalty=0.5)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw_reference(c, 0.3, lx, ly, band), (cost,))


def test_padding_never_leaks() -> None:
    cost, lx, ly = random_batch(3, 6, 8, seed=5)
    lx[1], ly[1] = 3, 4
    poisoned = cost.clone()
    poisoned[1, 3:, :] = float("nan")
    poisoned[1, :, 4:] = float("inf")
    poisoned.requires_grad_(True)
    value = soft_dtw(poisoned, 0.1, lx, ly, impl="reference")
    value.sum().backward()
    clean = soft_dtw(cost, 0.1, lx, ly, impl="reference")
    torch.testing.assert_close(value, clean)
    assert torch.isfinite(poisoned.grad).all()
    assert poisoned.grad[1, 3:, :].abs().sum() == 0 and poisoned.grad[1, :, 4:].abs().sum() == 0


def test_small_gamma_approaches_hard_dtw() -> None:
    cost, _, _ = random_batch(1, 12, 10, seed=2, ragged=False)
    hard, _ = naive_batch(cost, 1e-4)
    soft = soft_dtw(cost, 0.01, impl="reference")
    # soft-min is below the min by at most γ·log 3 per step and never above it
    assert (soft <= hard + 1e-9).all() and (soft >= hard - 0.01 * 21 * 1.0987).all()


def test_long_sequence_float32_is_finite() -> None:
    cost, lx, ly = random_batch(2, 160, 140, seed=9, dtype=torch.float32)
    cost.requires_grad_(True)
    value = soft_dtw(cost, 0.01, lx, ly, impl="reference")
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(cost.grad).all()


def test_cosine_cost_matches_loop_and_handles_zero_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    x[0, 1] = 0.0
    x.requires_grad_(True)
    got = cosine_cost(x, y)
    values = got.detach()
    for b in range(2):
        for i in range(4):
            for j in range(3):
                xi, yj = x[b, i].detach(), y[b, j]
                nx, ny = xi.norm(), yj.norm()
                want = 1.0 if nx == 0 else 1.0 - float(xi @ yj / (nx * ny))
                assert abs(float(values[b, i, j]) - want) < 1e-12
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_divergence_costs_equal_three_cosine_costs_with_their_gradients() -> None:
    """The divergence's costs (each side normalised once, self terms with a one-matmul backward) equal three
    `cosine_cost` calls in value and in gradient, also for an asymmetric upstream gradient and a zero row."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    x[1, 2] = 0.0
    weights = [torch.randn(2, n, m, generator=gen, dtype=torch.float64) for n, m in ((5, 3), (5, 5), (3, 3))]

    def grads(costs):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = costs(xs, ys)
        sum((c * w).sum() for c, w in zip(out, weights)).backward()
        return [c.detach() for c in out], xs.grad, ys.grad

    want, wx, wy = grads(lambda a, b: (cosine_cost(a, b), cosine_cost(a, a), cosine_cost(b, b)))
    got, gx, gy = grads(divergence_costs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gy, wy, rtol=1e-10, atol=1e-12)
    # a symmetric upstream gradient on the self terms (as Soft-DTW's E is there): the −2·G·u backward agrees
    weights[1], weights[2] = weights[1] + weights[1].mT, weights[2] + weights[2].mT
    want, wx, wy = grads(lambda a, b: (cosine_cost(a, b), cosine_cost(a, a), cosine_cost(b, b)))
    _, gx, gy = grads(lambda a, b: divergence_costs(a, b, symmetric_self_grad=True))
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gy, wy, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(self_cosine_cost, (torch.randn(2, 4, 3, dtype=torch.float64,
                                                                   requires_grad=True),))


def test_self_cost_under_autocast_runs_in_its_dtype_and_returns_the_input_dtype() -> None:
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = self_cosine_cost(x)
        plain = cosine_cost(x, x)
    assert cost.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(cost.float(), plain.float(), rtol=0, atol=1e-2)
    (grad,) = torch.autograd.grad(cost.float().sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_divergence_composition_and_zero_on_identical() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    lx, ly = torch.tensor([6, 4, 2]), torch.tensor([5, 5, 3])
    band = random_band(3, 6, 5, seed=4)
    got = soft_dtw_divergence(x, y, 0.1, lx, ly, band=band, impl="reference")
    cross, _ = naive_batch(cosine_cost(x, y), 0.1, lx, ly, band)
    sx, _ = naive_batch(cosine_cost(x, x), 0.1, lx, lx)
    sy, _ = naive_batch(cosine_cost(y, y), 0.1, ly, ly)
    torch.testing.assert_close(got, cross - 0.5 * (sx + sy), rtol=1e-10, atol=1e-10)
    same = soft_dtw_divergence(x, x, 0.1, lx, lx, impl="reference")
    torch.testing.assert_close(same, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_argument_errors_name_the_field() -> None:
    cost = torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match="lengths_x"):
        soft_dtw(cost, 0.1, lengths_x=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="lengths_y"):
        soft_dtw(cost, 0.1, lengths_y=torch.tensor([6, 4]))
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw(cost, 0.0)
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw_divergence(torch.rand(2, 3, 4), torch.rand(2, 5, 4), 1e7)
    with pytest.raises(ValueError, match="impl"):
        soft_dtw(cost, 0.1, impl="gpu")
    with pytest.raises(ValueError, match="SoftBand.center"):
        soft_dtw(cost, 0.1, band=SoftBand(torch.zeros(2, 5), torch.zeros(2, 4), 1.0))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_empty_batch(impl: str) -> None:
    cost = torch.rand(0, 4, 5, requires_grad=True)
    assert soft_dtw(cost, 0.1, impl=impl).shape == (0,)
    x, y = torch.rand(0, 4, 3, requires_grad=True), torch.rand(0, 6, 3)
    out = soft_dtw_divergence(x, y, 0.1, impl=impl)
    out.sum().backward()
    assert out.shape == (0,) and x.grad.shape == x.shape
