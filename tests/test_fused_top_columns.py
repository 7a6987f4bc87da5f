"""MultiLevelOT's fused LM head + top-k columns (`fused_head_top_columns`) against the dense path it replaces
(`std_normalised_probs` + `top_columns` on `F.linear` logits, autograd), and `multilevel_ot` with
`head_fusion: fused` against `dense`: values, gradients of the hidden rows, head and student parameters, heads with
padding rows, a vocabulary smaller than k, chunking, temperature, bf16 autocast, and the op's peak memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _baseline_helpers import Setup, check_auto_choice, check_bf16_fused_follows_dense, run_deferred
from _kd_helpers import one_thread

import dwakd.methods.multilevel_ot as mlot
from dwakd.evaluation.memory import peak_bytes
from dwakd.methods import build_method
from dwakd.methods.base import OptionError
from dwakd.ops.fused_kd.top_columns import fused_head_top_columns


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def leaves(rows: int, vocab: int, dtype=torch.float64, pad: int = 5, seed: int = 0, dim: int = 12):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab + pad, dim, generator=gen, dtype=dtype) * 0.8).requires_grad_(True)
    upstream = torch.randn(rows, 50, generator=gen, dtype=dtype)
    return hidden, weight, upstream


def dense(hidden, weight, vocab, temperature, k):
    return mlot.top_columns(mlot.std_normalised_probs(F.linear(hidden, weight), None, vocab, temperature), k)


@pytest.mark.parametrize("vocab,k", [(300, 50), (30, 50), (64, 7)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 4 * 300])  # one chunk; a few rows per chunk
def test_fused_equals_dense_float64(vocab, k, temperature, chunk_elements):
    hidden, weight, upstream = leaves(13, vocab)
    got = fused_head_top_columns(hidden, weight, vocab, temperature, k, chunk_elements=chunk_elements)
    want = dense(hidden, weight, vocab, temperature, k)
    assert got.shape == want.shape == (13, min(k, vocab))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    g = upstream[:, : got.shape[1]]
    g_got = torch.autograd.grad((got * g).sum(), (hidden, weight))
    g_want = torch.autograd.grad((want * g).sum(), (hidden, weight))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert g_got[1][vocab:].abs().sum() == 0 and g_got[1][:vocab].abs().sum() > 0  # padding rows get nothing


def test_gradcheck_float64():
    hidden, weight, _ = leaves(4, 9, pad=2, seed=1, dim=5)
    assert torch.autograd.gradcheck(lambda h, w: fused_head_top_columns(h, w, 9, 1.3, 4, chunk_elements=2 * 9),
                                    (hidden, weight), eps=1e-6, atol=1e-7)


def test_fp32_and_bf16_autocast_follow_the_dense_path():
    hidden, weight, upstream = leaves(16, 400, dtype=torch.float32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = fused_head_top_columns(hidden, weight, 400, 1.0, 50, chunk_elements=5 * 400)
            want = dense(hidden, weight, 400, 1.0, 50)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # backward outside autocast, as a training step runs it: the op must recompute as its forward did
        g_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
        g_want = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
        # relative to the dense path under bf16 autocast, measured: 0 on the rows, 2.5e-3 on the head (autograd rounds
        # its head gradient to bf16, the op accumulates it in fp32); a backward recomputing in fp32 was 5-6e-3 off both
        for a, b, tol in zip(g_got, g_want, (1e-3, 4e-3) if autocast else (1e-5, 1e-5), strict=True):
            assert a.dtype == torch.float32 and float((a - b).norm()) <= tol * float(b.norm())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 product is really used
        bf16 = fused_head_top_columns(hidden, weight, 400, 1.0, 50).detach()
    fp32 = fused_head_top_columns(hidden, weight, 400, 1.0, 50).detach()
    assert float((bf16 - fp32).abs().max()) > 1e-6


def test_peak_memory_is_one_chunk_not_the_whole_batch():
    rows, vocab = 256, 6000
    hidden, weight, upstream = leaves(rows, vocab, dtype=torch.float32)
    whole = rows * vocab * 4  # the logits of all rows, what the dense path holds at least (a chunk: 1/32 of it)

    def fused():
        (fused_head_top_columns(hidden, weight, vocab, 1.0, 50, chunk_elements=8 * vocab) * upstream).sum().backward()

    def reference():
        (dense(hidden, weight, vocab, 1.0, 50) * upstream).sum().backward()

    gradients = (weight.numel() + hidden.numel()) * 4
    assert peak_bytes(reference)[1] - gradients > whole
    assert peak_bytes(fused)[1] - gradients < 0.25 * whole


def test_bad_inputs_are_named():
    hidden, weight, _ = leaves(3, 10)
    with pytest.raises(ValueError, match="vocab must be"):
        fused_head_top_columns(hidden, weight, 99, 1.0, 5)
    with pytest.raises(ValueError, match="temperature"):
        fused_head_top_columns(hidden, weight, 10, 0.0, 5)


# ---- the method -------------------------------------------------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Records each fused top-columns call from the method (one per side that took the fused path)."""
    calls: list = []
    original = mlot.fused_head_top_columns

    def counted(hidden, weight, *args, **kwargs):
        calls.append("student" if weight.requires_grad else "teacher")
        return original(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(mlot, "fused_head_top_columns", counted)
    return calls


def run(setup: Setup, tmp_path, mode: str, defer: tuple[bool, bool] = (True, True), bf16_autocast: bool = False,
        **options):
    return run_deferred(setup, tmp_path, "multilevel_ot", {"head_fusion": mode, **options}, defer, bf16_autocast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("defer", [(True, True), (True, False), (False, True)])
def test_multilevel_ot_fused_equals_dense(dtype, defer, tmp_path, fused_calls):
    setup = Setup()
    setup.student.to(dtype)
    setup.teacher.to(dtype)
    options = {"student_temperature": 1.5, "top_k": 20}
    want = run(setup, tmp_path, "dense", defer, **options)
    assert fused_calls == []
    got = run(setup, tmp_path, "fused", defer, **options)
    assert fused_calls == [side for side, on in zip(("student", "teacher"), defer) if on]
    rtol = 1e-6 if dtype == torch.float64 else 2e-5  # the dense CE runs in fp32, the fused one in the input's dtype
    assert got[1].keys() == want[1].keys()
    for name, value in want[1].items():
        torch.testing.assert_close(got[1][name], value.to(got[1][name].dtype), rtol=rtol, atol=1e-12, msg=name)
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=rtol, atol=0)
    assert got[2].keys() == want[2].keys() and want[2]
    for name, grad in want[2].items():
        assert float((got[2][name] - grad).abs().max()) <= 1e-4 * float(grad.abs().max()), name


def test_bf16_autocast_fused_follows_dense(tmp_path, fused_calls):
    check_bf16_fused_follows_dense(run, tmp_path, fused_calls, ["student", "teacher"])


def test_auto_in_fp32_is_dense_and_fused_under_bf16_autocast(tmp_path, fused_calls):
    check_auto_choice(run, tmp_path, fused_calls)


def test_head_fusion_is_validated(tmp_path):
    with pytest.raises(OptionError, match="head_fusion"):
        build_method("multilevel_ot", Setup().context(tmp_path), {"head_fusion": "chunked"})
