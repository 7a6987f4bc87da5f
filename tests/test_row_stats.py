"""ops.row_stats: the one-pass CPU kernel and the chunked PyTorch path against a float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from dwakd.ops import _threads
from dwakd.ops.row_stats import row_entropy_peak, row_entropy_peak_reference


def float64_stats(x: torch.Tensor, rows: torch.Tensor | None, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = x[:, :vocab].double()
    if rows is not None:
        z = z[rows]
    p = torch.softmax(z, -1)
    log_p = torch.log_softmax(z, -1)
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return entropy, p.amax(-1)


def logits(rows: int, vocab: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.mark.parametrize("vocab", [2, 17, 1000, 50257])
def test_fast_path_matches_float64(vocab: int) -> None:
    x = logits(9, vocab)
    x[0, : vocab // 2] = float("-inf")  # a distribution that rules tokens out
    x[1] = 0.0  # uniform: H = log V, peak = 1/V
    x[2, 0] = 80.0  # one-hot within float32: H ≈ 0, peak ≈ 1
    entropy, peak = row_entropy_peak(x)
    ref_h, ref_p = float64_stats(x, None, vocab)
    torch.testing.assert_close(entropy.double(), ref_h, atol=2e-5 * max(1.0, math.log(vocab)), rtol=0)
    torch.testing.assert_close(peak.double(), ref_p, atol=0, rtol=5e-5)
    assert entropy[1].item() == pytest.approx(math.log(vocab), rel=1e-5)


def test_selected_rows_and_padding_columns_are_respected() -> None:
    x = logits(12, 300)
    x[:, 250:] = 50.0  # padding columns past the real vocabulary: must be ignored
    rows = torch.tensor([11, 0, 5, 5, 3])
    entropy, peak = row_entropy_peak(x, rows, 250)
    ref_h, ref_p = float64_stats(x, rows, 250)
    torch.testing.assert_close(entropy.double(), ref_h, atol=1e-4, rtol=0)
    torch.testing.assert_close(peak.double(), ref_p, atol=0, rtol=5e-5)


def test_reference_path_matches_float64_and_is_used_off_the_fast_path() -> None:
    x = logits(6, 700, seed=3)
    rows = torch.tensor([4, 1])
    ref_h, ref_p = float64_stats(x, rows, 650)
    entropy, peak = row_entropy_peak_reference(x, rows, 650)
    torch.testing.assert_close(entropy.double(), ref_h, atol=2e-4, rtol=0)
    torch.testing.assert_close(peak.double(), ref_p, atol=0, rtol=1e-5)
    wide = x.double()  # float64 input: the reference path, in float64
    entropy64, _ = row_entropy_peak(wide, rows, 650)
    assert entropy64.dtype == torch.float64
    torch.testing.assert_close(entropy64, ref_h, atol=1e-10, rtol=0)


def test_non_finite_rows_give_nan_like_the_reference() -> None:
    x = logits(4, 64)
    x[0, 7] = float("nan")
    x[1, 3] = float("inf")
    x[2] = float("-inf")
    entropy, peak = row_entropy_peak(x)
    assert torch.isnan(entropy[:3]).all() and torch.isnan(peak[:3]).all()
    assert torch.isfinite(entropy[3]) and torch.isfinite(peak[3])
    ref_h, _ = row_entropy_peak_reference(x, None, 64)
    assert torch.isnan(ref_h[:3]).all()


def test_threads_split_rows_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    x = logits(64, 4096, seed=5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = row_entropy_peak(x)
        torch.set_num_threads(2)
        monkeypatch.setattr(_threads, "_MIN_ELEMENTS_PER_THREAD", 1)  # force the split on any machine
        split = row_entropy_peak(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single[0], split[0]) and torch.equal(single[1], split[1])


def test_gradients_do_not_reach_the_inputs_and_bad_shapes_are_named() -> None:
    x = logits(3, 50).requires_grad_()
    entropy, peak = row_entropy_peak(x)
    assert not entropy.requires_grad and not peak.requires_grad
    with pytest.raises(ValueError, match="2-D"):
        row_entropy_peak(x.detach()[None])
    with pytest.raises(ValueError, match="vocab"):
        row_entropy_peak(x.detach(), None, 51)
    with pytest.raises(IndexError, match="rows must index the 3 rows"):
        row_entropy_peak(x.detach(), torch.tensor([0, 3]))
