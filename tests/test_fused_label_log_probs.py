"""ALM's fused LM head + label log-probabilities (`fused_head_label_log_probs`) against its plain reference (F.linear
logits, log-softmax, autograd): values and gradients of the hidden rows and the head (with padding rows), with and
without a space set, chunking, incoming gradients on both outputs, fp32 and bf16 autocast, the op's peak memory and
input errors."""

from __future__ import annotations

import pytest
import torch
from _kd_helpers import one_thread

from dwakd.evaluation.memory import peak_bytes
from dwakd.ops.fused_kd import fused_head_label_log_probs, head_label_log_probs_reference


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def head_rows(rows: int, vocab: int, dtype=torch.float64, pad: int = 5, hidden: int = 12, seed: int = 0):
    """Leaf hidden rows and a head with `pad` padding rows, labels, a space mask over the vocabulary, and incoming
    gradients (≠ 1, either sign) for the two outputs."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=gen, dtype=torch.float64) * 0.7).to(dtype).requires_grad_(True)
    w = torch.randn(vocab + pad, hidden, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    space = torch.rand(vocab, generator=gen) < 0.3
    incoming = torch.randn(2, rows, generator=gen, dtype=torch.float64).to(dtype)
    return h, w, labels, space, incoming


def weighted(outputs: tuple[torch.Tensor, torch.Tensor], incoming: torch.Tensor) -> torch.Tensor:
    """Σ_rows g_label·label_lp + g_space·space_lp: both outputs reach backward with their own gradients."""
    return (incoming[0].to(outputs[0].dtype) * outputs[0] + incoming[1].to(outputs[1].dtype) * outputs[1]).sum()


@pytest.mark.parametrize("with_space", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 3 * 70])  # one chunk; three rows per chunk (4 chunks)
def test_fused_equals_reference_float64(with_space, chunk_elements):
    h, w, labels, space, incoming = head_rows(11, 70)
    space = space if with_space else None
    got = fused_head_label_log_probs(h, w, 70, labels, space, chunk_elements=chunk_elements)
    want = head_label_log_probs_reference(h, w, 70, labels, space)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (got[1] == 0).all() != with_space  # zeros without a space set, log-masses < 0 with one
    g_got = torch.autograd.grad(weighted(got, incoming), (h, w))
    g_want = torch.autograd.grad(weighted(want, incoming), (h, w))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert g_got[1][70:].abs().sum() == 0  # padding rows of the head get nothing
    assert g_got[1][:70].abs().sum() > 0


@pytest.mark.parametrize("with_space", [False, True])
def test_gradcheck_float64(with_space):
    h, w, labels, space, _ = head_rows(4, 9, pad=2, hidden=5, seed=1)
    space = space if with_space else None
    assert torch.autograd.gradcheck(
        lambda hh, ww: fused_head_label_log_probs(hh, ww, 9, labels, space, chunk_elements=2 * 9), (h, w))


def test_only_one_output_used():
    """An output that does not reach the loss contributes nothing (autograd hands it a zero gradient)."""
    h, w, labels, space, _ = head_rows(6, 30, seed=2)
    for k in (0, 1):
        got = fused_head_label_log_probs(h, w, 30, labels, space, chunk_elements=2 * 30)[k]
        want = head_label_log_probs_reference(h, w, 30, labels, space)[k]
        for a, b in zip(torch.autograd.grad(got.sum(), (h, w)), torch.autograd.grad(want.sum(), (h, w)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fp32_and_bf16_autocast_follow_the_reference():
    h, w, labels, space, incoming = head_rows(16, 300, dtype=torch.float32, hidden=32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = fused_head_label_log_probs(h, w, 300, labels, space, chunk_elements=5 * 300)
            want = head_label_log_probs_reference(h, w, 300, labels, space)
        # backward outside autocast, as a training step runs it: the op must recompute as its forward did
        g_got = torch.autograd.grad(weighted(got, incoming), (h, w))
        g_want = torch.autograd.grad(weighted(want, incoming), (h, w))
        assert all(t.dtype == torch.float32 for t in (*got, *g_got))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # relative to the reference under bf16 autocast, measured: 0 on the rows, 2.3e-3 on the head (the reference
        # rounds its head gradient to bf16, the op accumulates it in fp32); an fp32 backward would be 6e-3 off both
        for a, b, tol in zip(g_got, g_want, (1e-3, 4e-3) if autocast else (1e-5, 1e-5), strict=True):
            assert float((a - b).norm()) <= tol * float(b.norm())
    # the bf16 products are really used (a path that ignored autocast would not see this difference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = fused_head_label_log_probs(h, w, 300, labels, space)
    fp32 = fused_head_label_log_probs(h, w, 300, labels, space)
    assert float((bf16[0] - fp32[0]).detach().abs().max()) > 1e-4


def test_peak_memory_is_one_chunk_not_the_whole_batch():
    rows, vocab = 256, 6000
    h, w, labels, space, incoming = head_rows(rows, vocab, dtype=torch.float32, hidden=32)
    whole = rows * vocab * 4  # the batch's fp32 logits, what the dense path holds at least

    def run(fn):
        weighted(fn(), incoming).backward()

    fused_peak = peak_bytes(lambda: run(lambda: fused_head_label_log_probs(
        h, w, vocab, labels, space, chunk_elements=16 * vocab)))[1]
    dense_peak = peak_bytes(lambda: run(lambda: head_label_log_probs_reference(h, w, vocab, labels, space)))[1]
    gradients = (w.numel() + h.numel()) * 4
    assert dense_peak - gradients > whole
    assert fused_peak - gradients < 0.25 * whole, (fused_peak, gradients, whole)


def test_bad_inputs_are_named():
    h, w, labels, space, _ = head_rows(4, 10)
    with pytest.raises(ValueError, match="vocab must be"):
        fused_head_label_log_probs(h, w, 99, labels)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_head_label_log_probs(h[0], w, 10, labels)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_head_label_log_probs(h, w[:, :3], 10, labels)
    with pytest.raises(ValueError, match="labels must be"):
        fused_head_label_log_probs(h, w, 10, labels[:3])
    with pytest.raises(ValueError, match="space_mask must be"):
        fused_head_label_log_probs(h, w, 10, labels, space[:7])
    with pytest.raises(ValueError, match="space_mask must be"):
        fused_head_label_log_probs(h, w, 10, labels, space.long())
