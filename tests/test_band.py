"""Attention-informed soft band (docs/methods.md §5.3, paper Eq. 19–22): centre, width, penalty on hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch
from _kd_helpers import naive_band, one_thread

from dwakd.modules.band import attention_band
from dwakd.modules.dtw import compact, compact_pairs, response_dtw_divergence


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one torch thread (restored afterwards)."""
    with one_thread():
        yield


def test_one_hot_attention_hand_worked() -> None:
    """n = 3, m = 5, row i attends only to teacher position 2i: entropy 0, width = base.

    ℓ = (0, 2, 4); c̃ = (0, 2, 4); c = 0.7·c̃ + 0.3·ℓ = (0, 2, 4). Row 1 with width 0.5: columns 0, 1, 3, 4 are
    outside (|j − 2| = 2, 1, 1, 2 > 0.5), column 2 inside.
    """
    attn = torch.zeros(1, 3, 5)
    attn[0, 0, 0] = attn[0, 1, 2] = attn[0, 2, 4] = 1.0
    band = attention_band(attn, torch.tensor([3]), torch.tensor([5]), base=0.5, sensitivity=2.0, blend=0.7, penalty=1.0)
    torch.testing.assert_close(band.center, torch.tensor([[0.0, 2.0, 4.0]]))
    torch.testing.assert_close(band.width, torch.full((1, 3), 0.5))
    outside = band.outside(5)[0]
    assert outside[1].tolist() == [True, True, False, True, True]
    cost = torch.zeros(1, 3, 5)
    assert band.apply(cost)[0, 1].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_uniform_attention_hand_worked() -> None:
    """n = 2, m = 4, uniform rows: c̃ = 1.5, H = log 4, w = 5 + 2 log 4; ℓ = (0, 3).

    c = 0.7·1.5 + 0.3·ℓ = (1.05, 1.95).
    """
    attn = torch.full((1, 2, 4), 0.25)
    band = attention_band(attn, torch.tensor([2]), torch.tensor([4]))
    torch.testing.assert_close(band.center, torch.tensor([[1.05, 1.95]]))
    torch.testing.assert_close(band.width, torch.full((1, 2), 5 + 2 * math.log(4)))
    assert band.penalty == 1.0 and not band.outside(4).any()  # a 5-token base covers all of 4 columns


def test_random_attention_matches_loops_and_ignores_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths_s, lengths_t = torch.tensor([4, 1, 6]), torch.tensor([7, 3, 2])
    attn = torch.zeros(3, 6, 7, dtype=torch.float64)
    for b in range(3):
        n, m = int(lengths_s[b]), int(lengths_t[b])
        attn[b, :n, :m] = torch.softmax(torch.randn(n, m, generator=gen, dtype=torch.float64) * 2, -1)
    attn[:, :, :] += (attn == 0) * 123.0  # garbage outside the valid block must be ignored
    band = attention_band(attn, lengths_s, lengths_t, base=1.5, sensitivity=0.8, blend=0.6, penalty=2.5)
    for b in range(3):
        n, m = int(lengths_s[b]), int(lengths_t[b])
        centres, widths = naive_band(attn[b, :n, :m].tolist(), 1.5, 0.8, 0.6)
        for i in range(n):
            assert band.center[b, i].item() == pytest.approx(centres[i], rel=1e-12, abs=1e-12)
            assert band.width[b, i].item() == pytest.approx(widths[i], rel=1e-12)
        if n == 1:  # a single student position: the linear centre is 0, the centre is β·c̃
            soft = sum(j * a for j, a in enumerate(attn[b, 0, :m].tolist()))
            assert band.center[b, 0].item() == pytest.approx(0.6 * soft)
    assert band.penalty == 2.5


def test_float32_band_matches_a_float64_loop_on_peaked_flat_and_empty_rows() -> None:
    """float32 attention at the demo's size (rows from near one-hot to flat, rows that sum to 0.9 or 1.2, a valid row
    with no attention at all) against the float64 loop: centres and widths to float32 rounding, and the penalised
    cells the same. The empty row has c̃ = 0 and H = 0: its centre is the linear one, its width the base."""
    gen = torch.Generator().manual_seed(7)
    lengths_s, lengths_t = torch.tensor([60, 128, 1, 97]), torch.tensor([66, 141, 9, 100])
    batch, n, m = 4, 128, 141
    scale = torch.logspace(-1, 2, n).view(1, n, 1)  # flat → near one-hot
    attn = torch.zeros(batch, n, m)
    for b in range(batch):
        rows, cols = int(lengths_s[b]), int(lengths_t[b])
        attn[b, :rows, :cols] = torch.softmax(torch.randn(rows, cols, generator=gen) * scale[0, :rows], -1)
    attn[0, 5] *= 0.9
    attn[0, 6] *= 1.2
    attn[3, 10] = 0.0
    band = attention_band(attn, lengths_s, lengths_t, base=5.0, sensitivity=2.0, blend=0.7)
    for b in range(batch):
        rows, cols = int(lengths_s[b]), int(lengths_t[b])
        block = attn[b, :rows, :cols].double().tolist()
        if b == 3:  # the loop divides by the row's sum: a stand-in for the empty row, its expectation by hand below
            block[10] = [1.0] + [0.0] * (cols - 1)
        centres, widths = naive_band(block, 5.0, 2.0, 0.7)
        if b == 3:
            centres[10], widths[10] = 0.3 * 10 * (cols - 1) / (rows - 1), 5.0
        torch.testing.assert_close(band.center[b, :rows].double(), torch.tensor(centres, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(band.width[b, :rows].double(), torch.tensor(widths, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-5)
        outside = [[abs(j - c) > w for j in range(m)] for c, w in zip(centres, widths, strict=True)]
        assert band.outside(m)[b, :rows].tolist() == outside
    assert band.width[3, 10].item() == 5.0


def test_band_carries_no_gradient() -> None:
    attn = torch.softmax(torch.randn(1, 3, 4), -1).requires_grad_()
    band = attention_band(attn, torch.tensor([3]), torch.tensor([4]))
    assert not band.center.requires_grad and not band.width.requires_grad


def test_compaction_keeps_response_order() -> None:
    x = torch.arange(2 * 5, dtype=torch.float64).view(2, 5, 1)
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out, lengths = compact(x, mask)
    assert lengths.tolist() == [3, 1]
    assert out[..., 0].tolist() == [[1.0, 3.0, 4.0], [5.0, 0.0, 0.0]]
    pairs = torch.arange(2 * 5 * 5, dtype=torch.float64).view(2, 5, 5)
    got = compact_pairs(pairs, mask, mask)
    assert got[0].tolist() == [[pairs[0, r, c].item() for c in (1, 3, 4)] for r in (1, 3, 4)]


def test_compaction_matches_a_loop_in_value_and_gradient() -> None:
    """`compact` / `compact_pairs` (one flat index_select, then a gather over columns) against a loop over rows:
    holes in the masks, empty rows, widths wider than the longest row; the gradient lands on the gathered
    positions only. A sequence whose length does not fit the mask is an error, not a silent misread."""
    gen = torch.Generator().manual_seed(4)
    mask_rows = torch.rand(3, 7, generator=gen) < 0.6
    mask_rows[1] = False  # an empty row
    mask_rows[:, 0] = False  # every row shorter than the width, 7
    mask_cols = torch.rand(3, 6, generator=gen) < 0.5
    x = torch.randn(3, 7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    pairs = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    width = 7
    out, lengths = compact(x, mask_rows, width)
    expected = torch.zeros(3, width, 2, dtype=torch.float64)
    grid = torch.zeros(3, width, int(mask_cols.sum(-1).max()), dtype=torch.float64)
    for b in range(3):
        rows = [i for i in range(7) if mask_rows[b, i]]
        cols = [j for j in range(6) if mask_cols[b, j]]
        for k, i in enumerate(rows):
            expected[b, k] = x[b, i].detach()
            for c, j in enumerate(cols):
                grid[b, k, c] = pairs[b, i, j]
        assert lengths[b].item() == len(rows)
    assert torch.equal(out, expected)
    assert torch.equal(compact_pairs(pairs, mask_rows, mask_cols, (width, grid.shape[2])), grid)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    expected_grad = torch.zeros_like(x)
    for b in range(3):
        for k, i in enumerate(i for i in range(7) if mask_rows[b, i]):
            expected_grad[b, i] = weights[b, k]
    assert torch.equal(x.grad, expected_grad)
    with pytest.raises(ValueError, match=r"does not fit a mask of shape \(3, 7\)"):
        compact(x[:, :6], mask_rows)
    with pytest.raises(ValueError, match="does not fit a column mask of length 6"):
        compact_pairs(pairs[:, :, :5], mask_rows, mask_cols)


def test_divergence_zero_for_identical_and_symmetric_unbanded() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    mx = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    my = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    same = response_dtw_divergence(x, x, mx, mx, gamma=0.7)
    torch.testing.assert_close(same, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    forward = response_dtw_divergence(x, y, mx, my, gamma=0.7)
    backward = response_dtw_divergence(y, x, my, mx, gamma=0.7)
    torch.testing.assert_close(forward, backward, rtol=1e-12, atol=1e-12)
    assert (forward > 0).all()
    # prompt/padding content is invisible: only the response positions are aligned
    x2 = x.clone()
    x2[~mx] = 99.0
    torch.testing.assert_close(response_dtw_divergence(x2, y, mx, my, gamma=0.7), forward)
