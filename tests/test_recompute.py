"""`dwakd.modules.recompute.recompute_in_backward` against the same region run directly (float64 gradcheck)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dwakd.modules.recompute import recompute_in_backward


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64)  # an input without gradient
    return linear, x, y


def _region(linear: nn.Linear, calls: list[bool]):
    def fn(x: torch.Tensor, y: torch.Tensor, unused: torch.Tensor | None) -> list[torch.Tensor]:
        calls.append(torch.is_grad_enabled())
        h = torch.tanh(linear(x))
        return [(h * y).sum(), h.pow(2).sum()]

    return fn


def test_values_and_gradients_equal_the_direct_region() -> None:
    """Inputs and the closure's parameters get the direct region's gradients; a parameter also used outside the
    region (here the weight, in `outside`) receives the sum of both uses, once."""
    linear, x, y = _setup()
    calls: list[bool] = []
    fn = _region(linear, calls)
    params = lambda: list(linear.parameters())  # noqa: E731

    def loss(recomputed: bool) -> torch.Tensor:
        a, b = recompute_in_backward(fn, (x, y, None), params) if recomputed else fn(x, y, None)
        outside = linear.weight.sum() * 0.5
        return 0.7 * a - 1.3 * b + outside

    direct = loss(False)
    want = torch.autograd.grad(direct, [x, *linear.parameters()])
    calls.clear()
    got_value = loss(True)
    got = torch.autograd.grad(got_value, [x, *linear.parameters()])
    assert calls == [False, True]  # forward without a graph, backward with one
    assert torch.equal(got_value, direct)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-14)


def test_gradcheck_and_no_grad() -> None:
    linear, x, y = _setup(1)
    fn = _region(linear, [])
    params = lambda: list(linear.parameters())  # noqa: E731
    assert torch.autograd.gradcheck(lambda x_: sum(recompute_in_backward(fn, (x_, y, None), params)), (x,))
    calls: list[bool] = []
    with torch.no_grad():
        a, _ = recompute_in_backward(_region(linear, calls), (x, y, None), params)
    assert calls == [False] and not a.requires_grad


def test_frozen_parameters_and_inputs_get_no_gradient() -> None:
    linear, x, y = _setup(2)
    linear.bias.requires_grad_(False)
    x.requires_grad_(False)
    a, b = recompute_in_backward(_region(linear, []), (x, y, None), lambda: [linear.weight])
    (a + b).backward()
    assert linear.weight.grad is not None and linear.bias.grad is None


@pytest.mark.parametrize("recomputed", [False, True])
def test_soft_dtw_kernel_keeps_no_alignments_in_forward(recomputed: bool, monkeypatch) -> None:
    """The point of a graph-free forward: the Soft-DTW CPU divergence computes values only (no E) when run in
    `recompute_in_backward`, and E only once, in backward."""
    from dwakd.ops.soft_dtw import cpu, soft_dtw_divergence

    stores: list[bool] = []
    real = cpu._sweep

    def spy(gamma, plan, band, store, costs):
        stores.append(bool(store))
        return real(gamma, plan, band, store, costs)

    monkeypatch.setattr(cpu, "_sweep", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, requires_grad=True)
    y = torch.randn(2, 5, 3)

    def fn(x_: torch.Tensor, y_: torch.Tensor) -> list[torch.Tensor]:
        return [soft_dtw_divergence(x_, y_, 0.5, impl="cpu").sum()]

    (value,) = recompute_in_backward(fn, (x, y), lambda: []) if recomputed else fn(x, y)
    assert stores == ([False] if recomputed else [True])
    value.backward()
    assert stores == ([False, True] if recomputed else [True])
    assert x.grad is not None and torch.isfinite(x.grad).all()
