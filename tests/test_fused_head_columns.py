"""CDM's fused head ops (`head_entropy`, `head_topk`, `gathered_head_logits`) against their dense references
(`F.linear` logits, autograd), and `cdm` with `head_fusion: fused` against `dense`: values, gradients of the hidden
rows, head and student parameters, heads with padding rows, repeated columns, chunking, bf16 autocast, the peak
memory of the fused path, input errors and option validation."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import Setup, check_auto_choice, check_bf16_fused_follows_dense, run_deferred
from _kd_helpers import one_thread

import dwakd.methods.cdm as cdm
from dwakd.evaluation.memory import peak_bytes
from dwakd.methods import build_method
from dwakd.methods.base import OptionError
from dwakd.ops.fused_kd.head_columns import gathered_head_logits, head_entropy, head_topk
from dwakd.ops.fused_kd.reference import (
    gathered_head_logits_reference,
    head_entropy_reference,
    head_topk_reference,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def leaves(rows: int, vocab: int, dtype=torch.float64, pad: int = 5, seed: int = 0, dim: int = 12, width: int = 30):
    """Hidden rows, a head with `pad` padding rows, columns (rows, width) in [0, vocab) with repeats, an upstream
    gradient ≠ 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab + pad, dim, generator=gen, dtype=dtype) * 0.8).requires_grad_(True)
    cols = torch.randint(0, vocab, (rows, width), generator=gen)
    cols[:, 1] = cols[:, 0]  # a column gathered twice in every row: its gradients add up
    upstream = torch.randn(rows, width, generator=gen, dtype=dtype)
    return hidden, weight, cols, upstream


@pytest.mark.parametrize("vocab", [300, 40])
@pytest.mark.parametrize("chunk_elements", [1 << 22, 3 * 300])  # one chunk; a few rows per chunk
def test_ops_equal_the_dense_reference_float64(vocab, chunk_elements):
    hidden, weight, cols, upstream = leaves(13, vocab)
    torch.testing.assert_close(head_entropy(hidden, weight, vocab, chunk_elements),
                               head_entropy_reference(hidden, weight, vocab).detach(), rtol=1e-12, atol=1e-12)
    for k in (7, 50):
        got = head_topk(hidden, weight, vocab, k, chunk_elements)
        assert got.shape == (13, min(k, vocab)) and torch.equal(got, head_topk_reference(hidden, weight, vocab, k))
    got = gathered_head_logits(hidden, weight, vocab, cols, chunk_elements=chunk_elements // 4)
    want = gathered_head_logits_reference(hidden, weight, vocab, cols)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    g_want = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_got[1][vocab:].abs().sum() == 0 and g_got[1][:vocab].abs().sum() > 0  # padding rows get nothing


def test_gathered_logits_gradcheck_float64():
    hidden, weight, cols, _ = leaves(5, 9, pad=2, seed=1, dim=4, width=6)
    assert torch.autograd.gradcheck(lambda h, w: gathered_head_logits(h, w, 9, cols, chunk_elements=2 * 6 * 4),
                                    (hidden, weight), eps=1e-6, atol=1e-7)


def test_fp32_and_bf16_autocast_follow_the_dense_path():
    hidden, weight, cols, upstream = leaves(16, 400, dtype=torch.float32)
    for autocast in (False, True):
        tol = 1e-2 if autocast else 1e-5  # bf16 products round differently
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            entropy = head_entropy(hidden, weight, 400, chunk_elements=5 * 400)
            want_entropy = head_entropy_reference(hidden, weight, 400).detach()
            got = gathered_head_logits(hidden, weight, 400, cols, chunk_elements=5 * 30 * 12)
            want = gathered_head_logits_reference(hidden, weight, 400, cols)
        assert entropy.dtype == got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(entropy, want_entropy, rtol=tol, atol=tol)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        g_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
        g_want = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
        for a, b in zip(g_got, g_want, strict=True):
            assert a.dtype == torch.float32 and float((a - b).norm()) <= tol * float(b.norm())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 products are really used
        bf16 = (head_entropy(hidden, weight, 400), gathered_head_logits(hidden, weight, 400, cols).detach())
    fp32 = (head_entropy(hidden, weight, 400), gathered_head_logits(hidden, weight, 400, cols).detach())
    for a, b in zip(bf16, fp32, strict=True):
        assert float((a - b).abs().max()) > 1e-6


def test_bf16_head_gradient_is_summed_before_rounding():
    """A bf16 head (no autocast): bf16 products, fp32 logits, and a column gathered 2000 times gets the exact sum of
    its products to one bf16 rounding, not 2000 bf16 additions (which stall once the sum dwarfs each term; CPU's
    2-D `index_add_` happens to sum first anyway, CUDA's atomic adds do not)."""
    hidden, weight, _, _ = leaves(100, 50, dtype=torch.float32, seed=2)
    hidden = hidden.detach().abs().bfloat16().requires_grad_(True)  # positive products: the sum only grows
    weight = weight.detach().bfloat16().requires_grad_(True)
    cols = torch.zeros(100, 20, dtype=torch.long)
    got = gathered_head_logits(hidden, weight, 50, cols)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, gathered_head_logits_reference(hidden, weight, 50, cols), rtol=0, atol=0)
    (grad_w,) = torch.autograd.grad(got.sum(), weight)
    exact = hidden.detach().double().sum(0) * 20  # d/dW[0] of Σ ⟨h_g, W[0]⟩ over 20 columns per row
    torch.testing.assert_close(grad_w[0].double(), exact, rtol=2 ** -8, atol=0)
    assert grad_w[1:].abs().sum() == 0


def test_peak_memory_is_one_chunk_not_the_whole_batch():
    """CDM's head terms of one side: entropies of all rows, top-k of the pooled rows and the gathered columns with
    their gradients, against the dense logits of the rows the reference forms."""
    rows, vocab, groups, k = 256, 6000, 128, 100
    hidden, weight, _, _ = leaves(rows, vocab, dtype=torch.float32, width=2)
    upstream = torch.randn(groups, 2 * k)
    whole = rows * vocab * 4  # the logits of all rows, what the dense path holds at least (a chunk: 1/32 of it)

    def pooled():  # (groups, d) rows averaged in pairs, differentiable
        return hidden[:groups] * 0.5 + hidden[groups:] * 0.5

    def fused():
        rows_p = pooled()
        head_entropy(hidden.detach(), weight.detach(), vocab, chunk_elements=8 * vocab)
        top = head_topk(rows_p.detach(), weight.detach(), vocab, k, chunk_elements=8 * vocab)
        cols = torch.cat([top, top.flip(1)], 1)
        (gathered_head_logits(rows_p, weight, vocab, cols, chunk_elements=8 * 2 * k * 12) * upstream).sum().backward()

    def reference():
        rows_p = pooled()
        head_entropy_reference(hidden.detach(), weight.detach(), vocab)
        top = head_topk_reference(rows_p, weight, vocab, k)
        cols = torch.cat([top, top.flip(1)], 1)
        (gathered_head_logits_reference(rows_p, weight, vocab, cols) * upstream).sum().backward()

    gradients = (weight.numel() + hidden.numel()) * 4
    assert peak_bytes(reference)[1] - gradients > whole
    assert peak_bytes(fused)[1] - gradients < 0.25 * whole


def test_bad_inputs_are_named():
    hidden, weight, cols, _ = leaves(3, 10)
    with pytest.raises(ValueError, match="vocab must be"):
        head_entropy(hidden, weight, 99)
    with pytest.raises(ValueError, match="hidden must be"):
        head_topk(hidden[0], weight, 10, 3)
    with pytest.raises(ValueError, match="k must be"):
        head_topk(hidden, weight, 10, 0)
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 10\)"):
        gathered_head_logits(hidden, weight, 10, cols + 9)  # padding rows are not columns
    with pytest.raises(ValueError, match="cols must be int64"):
        gathered_head_logits(hidden, weight, 10, cols[:2])


# ---- the method -------------------------------------------------------------------------------------------------


SIDE_BY_WIDTH = {16: "student", 24: "teacher"}  # `Setup`'s hidden sizes


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Records each fused top-k call from the method (one per side that took the fused path)."""
    calls: list = []
    original = cdm.head_topk

    def counted(hidden, weight, *args, **kwargs):
        calls.append(SIDE_BY_WIDTH[hidden.shape[1]])
        return original(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(cdm, "head_topk", counted)
    return calls


def run(setup: Setup, tmp_path, mode: str, defer: tuple[bool, bool] = (True, True), bf16_autocast: bool = False,
        **options):
    return run_deferred(setup, tmp_path, "cdm", {"head_fusion": mode, **options}, defer, bf16_autocast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("defer", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("entropy_weights", [True, False])
def test_cdm_fused_equals_dense(dtype, defer, entropy_weights, tmp_path, fused_calls):
    setup = Setup()
    setup.student.to(dtype)
    setup.teacher.to(dtype)
    options = {"top_k": 20, "kd_temperature": 1.5, "entropy_weights": entropy_weights}
    want = run(setup, tmp_path, "dense", defer, **options)
    assert fused_calls == []
    got = run(setup, tmp_path, "fused", defer, **options)
    assert fused_calls == [side for side, on in zip(("student", "teacher"), defer) if on]
    tight = dtype == torch.float64
    torch.testing.assert_close(got[1]["kd"], want[1]["kd"], rtol=1e-10 if tight else 2e-5, atol=1e-12)
    rtol = 1e-6 if tight else 2e-5  # the dense CE runs in fp32, the fused one in the input's dtype
    torch.testing.assert_close(got[1]["ce"], want[1]["ce"].to(got[1]["ce"].dtype), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=rtol, atol=0)
    assert got[2].keys() == want[2].keys() and want[2]
    for name, grad in want[2].items():
        assert float((got[2][name] - grad).abs().max()) <= 1e-4 * float(grad.abs().max()), name


def test_cdm_kd_gradients_fused_equal_dense_float64(tmp_path):
    """The KD term alone (kd_rate 1: no CE, whose dense path runs in fp32), so its student gradients compare at
    float64 precision."""
    setup = Setup()
    options = {"top_k": 20, "kd_rate": 1.0}
    want = run(setup, tmp_path, "dense", **options)
    got = run(setup, tmp_path, "fused", **options)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert got[2].keys() == want[2].keys() and want[2]
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-8, atol=1e-10 * float(grad.abs().max()), msg=name)


def test_bf16_autocast_fused_follows_dense(tmp_path, fused_calls):
    check_bf16_fused_follows_dense(run, tmp_path, fused_calls, ["student", "teacher"])


def test_auto_in_fp32_is_dense_and_fused_under_bf16_autocast(tmp_path, fused_calls):
    check_auto_choice(run, tmp_path, fused_calls)


def test_head_fusion_is_validated(tmp_path):
    with pytest.raises(OptionError, match="head_fusion"):
        build_method("cdm", Setup().context(tmp_path), {"head_fusion": "chunked"})
