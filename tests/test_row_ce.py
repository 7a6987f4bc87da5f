"""`dwakd.ops.row_ce`: the numba CE per row (and argmax) against `F.cross_entropy` in float64, non-finite rows,
row-strided views, thread splits, the fallback and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dwakd.ops import row_ce
from dwakd.ops.row_ce import fast_path_applies, label_ce_rows


def float64_reference(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor):
    """(CE, d(Σ grad_out·CE)/dz) of F.cross_entropy in float64."""
    z = logits.detach().double().requires_grad_(True)
    ce = F.cross_entropy(z, labels, reduction="none")
    (grad,) = torch.autograd.grad(ce, z, grad_out.double())
    return ce.detach(), grad


def ours(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor):
    z = logits.detach().clone().requires_grad_(True)
    ce, argmax = label_ce_rows(z, labels, with_argmax=True)
    (grad,) = torch.autograd.grad(ce, z, grad_out)
    return ce.detach(), argmax, grad


def case(rows: int, vocab: int, seed: int = 0, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * scale
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    grad_out = torch.randn(rows, generator=gen)  # a weighted sum: every row's own dL/dCE
    return logits, labels, grad_out


@pytest.mark.parametrize("rows,vocab,threads", [(37, 5003, 1), (5, 17, 1), (64, 50_000, 2)])
def test_fast_path_equals_float64_reference(rows, vocab, threads):
    logits, labels, grad_out = case(rows, vocab)
    logits[0, :4] = logits[0].max() + 1.0  # a tie for the maximum: the first index wins, as torch.argmax
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 64 × 50,000 entries split over two threads
    try:
        ce, argmax, grad = ours(logits, labels, grad_out)
    finally:
        torch.set_num_threads(before)
    want_ce, want_grad = float64_reference(logits, labels, grad_out)
    assert ce.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-6)
    assert torch.equal(argmax, logits.argmax(-1)) and int(argmax[0]) == 0


def test_non_finite_rows_follow_the_reference():
    logits, labels, grad_out = case(9, 301)
    logits[1, 7] = float("-inf")  # one masked entry: finite CE
    logits[2] = float("-inf")  # every entry −inf: NaN
    logits[3, 2] = float("nan")
    logits[4, 9] = float("inf")
    logits[5, labels[5]] = float("-inf")  # the label masked: +inf CE
    ce, argmax, grad = ours(logits, labels, grad_out)
    want_ce, want_grad = float64_reference(logits, labels, grad_out)
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-6, equal_nan=True)
    assert torch.equal(argmax, logits.argmax(-1))


def test_row_strided_view_of_a_padded_head():
    """The methods pass `logits[:, :V]` of a head with padding rows: the gradient reaches the base tensor, with
    zeros in the padding columns."""
    logits, labels, grad_out = case(6, 250)
    base = torch.cat([logits, torch.randn(6, 7)], 1).requires_grad_(True)
    view = base[:, :250]
    assert fast_path_applies(view) and not view.is_contiguous()
    ce, _ = label_ce_rows(view, labels)
    (grad,) = torch.autograd.grad(ce, base, grad_out)
    want_ce, want_grad = float64_reference(logits, labels, grad_out)
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[:, :250].double(), want_grad, rtol=0, atol=1e-6)
    assert not grad[:, 250:].any()


def test_the_fast_path_is_taken_for_fp32_cpu_logits_only(monkeypatch):
    calls = []
    original = row_ce._LabelCE.apply
    monkeypatch.setattr(row_ce._LabelCE, "apply", lambda *args: calls.append(1) or original(*args))
    logits, labels, grad_out = case(4, 40)
    label_ce_rows(logits, labels)
    assert calls == [1]
    for other in (logits.double(), logits.bfloat16()):  # the reference: float64 stays, 16-bit in fp32
        assert not fast_path_applies(other)
        ce, argmax = label_ce_rows(other, labels, with_argmax=True)
        assert ce.dtype == (torch.float64 if other.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(ce, F.cross_entropy(other.to(ce.dtype), labels, reduction="none"))
        assert torch.equal(argmax, other.argmax(-1))
    assert calls == [1]
    ce, argmax = label_ce_rows(logits[:0], labels[:0], with_argmax=True)
    assert ce.shape == argmax.shape == (0,)
    assert label_ce_rows(logits, labels)[1] is None and label_ce_rows(logits.double(), labels)[1] is None


def test_bad_inputs_are_named():
    logits, labels, _ = case(4, 40)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 40\); got values in \[.*, 40\]"):
        label_ce_rows(logits, torch.tensor([0, 1, 2, 40]))
    with pytest.raises(ValueError, match="labels must lie"):
        label_ce_rows(logits, torch.tensor([0, -100, 2, 3]))
    with pytest.raises(ValueError, match=r"logits must be \(rows, V\)"):
        label_ce_rows(logits, labels[:3])
