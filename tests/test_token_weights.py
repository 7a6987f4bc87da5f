"""Token weights (docs/methods.md §5.1): entropy, gate, per-sequence rescaling, no gradient, padding rows excluded."""

from __future__ import annotations

import math

import pytest
import torch
from _kd_helpers import one_thread

from dwakd.modules.token_weights import (
    normalized_entropy,
    peak_probability,
    rescale_per_sequence,
    student_token_weights,
    teacher_token_weights,
    valid_rows,
)

VOCAB, ROWS = 7, 9  # the head has two padding rows beyond the vocabulary


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one torch thread (restored afterwards)."""
    with one_thread():
        yield


def loop_entropy(z: list[float]) -> float:
    """H(softmax(z)) / log V by loops."""
    e = [math.exp(v - max(z)) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(pk * math.log(pk) for pk in p if pk > 0) / math.log(len(z))


def loop_peak(z: list[float]) -> float:
    """max softmax(z) by loops."""
    e = [math.exp(v - max(z)) for v in z]
    return max(e) / sum(e)


@pytest.fixture()
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 6, ROWS, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.tensor(
        [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool
    )  # (batch, length): prompt/padding False
    gate = torch.rand(int(mask.sum()), generator=gen, dtype=torch.float64)
    return logits, mask, gate


def test_entropy_and_peak_match_loops(batch) -> None:
    logits, mask, _ = batch
    rows = valid_rows(mask)
    ent = normalized_entropy(logits, rows, VOCAB)
    peak = peak_probability(logits, rows, VOCAB)
    flat = logits.detach().reshape(-1, ROWS)
    for k, r in enumerate(rows.tolist()):
        z = flat[r, :VOCAB].tolist()
        assert ent[k].item() == pytest.approx(loop_entropy(z), rel=1e-12)
        assert peak[k].item() == pytest.approx(loop_peak(z), rel=1e-12)


def test_student_weights_formula_sum_and_no_grad(batch) -> None:
    logits, mask, gate = batch
    w = student_token_weights(logits, mask, VOCAB, gate)
    assert not w.weights.requires_grad and not w.raw.requires_grad
    flat = logits.detach()
    k = 0
    for b in range(3):
        raw = []
        for i in range(6):
            if mask[b, i]:
                raw.append(loop_entropy(flat[b, i, :VOCAB].tolist()) * gate[k].item())
                k += 1
        count = len(raw)
        it = iter(raw)
        for i in range(6):
            if mask[b, i]:
                assert w.weights[b, i].item() == pytest.approx(next(it) * count / sum(raw), rel=1e-10)
            else:
                assert w.weights[b, i].item() == 0.0
        assert w.weights[b].sum().item() == pytest.approx(count, rel=1e-12)


def test_gate_behaviour(batch) -> None:
    logits, mask, gate = batch
    ungated = student_token_weights(logits, mask, VOCAB, None)
    gated = student_token_weights(logits, mask, VOCAB, gate)
    ent = normalized_entropy(logits, valid_rows(mask), VOCAB)
    # g ≡ 1: weights ∝ entropy within a sequence; the gate multiplies the raw weights position by position
    torch.testing.assert_close(ungated.raw[mask], ent)
    torch.testing.assert_close(gated.raw[mask], ent * gate)
    # a uniform gate changes nothing after rescaling; doubling one position's gate raises only its share
    flat_gate = torch.full_like(gate, 0.3)
    torch.testing.assert_close(student_token_weights(logits, mask, VOCAB, flat_gate).weights, ungated.weights)
    bumped = gate.clone()
    bumped[1] *= 2  # second valid position of sequence 0 (position 2)
    moved = student_token_weights(logits, mask, VOCAB, bumped).weights
    assert moved[0, 2] > gated.weights[0, 2] and moved[0, 1] < gated.weights[0, 1]
    torch.testing.assert_close(moved[1:], gated.weights[1:])


def test_teacher_weights_are_confidence(batch) -> None:
    logits, mask, _ = batch
    u = teacher_token_weights(logits, mask, VOCAB)
    conf = 1 - normalized_entropy(logits, valid_rows(mask), VOCAB)
    torch.testing.assert_close(u.raw[mask], conf)
    torch.testing.assert_close(u.weights.sum(-1), mask.sum(-1).double())
    # a sharper teacher position gets more weight than a flat one in the same sequence
    sharp = logits.detach().clone()
    sharp[1, 0, 0] = 50.0
    sharp[1, 1, :] = 0.0
    u2 = teacher_token_weights(sharp, mask, VOCAB)
    assert u2.weights[1, 0] > 1.0 > u2.weights[1, 1] and u2.weights[1, 1].item() == pytest.approx(0.0, abs=1e-12)


def test_padding_rows_of_the_head_do_not_count(batch) -> None:
    logits, mask, gate = batch
    changed = logits.detach().clone()
    changed[..., VOCAB:] = 1e4  # huge logits in the padding rows: would dominate any softmax that saw them
    torch.testing.assert_close(student_token_weights(changed, mask, VOCAB, gate).weights,
                               student_token_weights(logits, mask, VOCAB, gate).weights)
    torch.testing.assert_close(peak_probability(changed, None, VOCAB), peak_probability(logits, None, VOCAB))


def test_rescale_zero_sum_falls_back_to_uniform() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    raw = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    out = rescale_per_sequence(raw, mask)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0], [0.5, 1.0, 1.5]]))


def test_bf16_autocast_does_not_lower_the_precision(batch) -> None:
    logits, mask, gate = batch
    logits = logits.detach().float()
    plain = student_token_weights(logits, mask, VOCAB, gate.float()).weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(student_token_weights(logits, mask, VOCAB, gate.float()).weights, plain)
