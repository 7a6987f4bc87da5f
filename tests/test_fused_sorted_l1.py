"""ULD's fused LM head + sorted L1 (`fused_head_sorted_l1`) against its plain reference (torch.sort + autograd), and
`uld` with `head_fusion: fused` against `dense`: values, gradients of the student hidden rows, head and parameters,
heads with padding rows, either vocabulary the larger, chunking, a teacher given as logits, bf16 autocast, and the
op's peak memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _baseline_helpers import Setup, check_bf16_fused_follows_dense, run_deferred
from _kd_helpers import one_thread

import dwakd.methods.uld as uld_module
from dwakd.evaluation.memory import peak_bytes
from dwakd.methods import build_method
from dwakd.methods.base import OptionError
from dwakd.ops.fused_kd import fused_head_sorted_l1, sorted_l1_reference


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def heads(rows: int, s_vocab: int, t_vocab: int, dtype=torch.float64, pad: int = 5, seed: int = 0):
    """Random hidden rows and heads with `pad` padding rows each; the student's hidden rows and head are leaves."""
    gen = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(rows, 12, generator=gen, dtype=dtype).requires_grad_(True)
    s_weight = torch.randn(s_vocab + pad, 12, generator=gen, dtype=dtype).requires_grad_(True)
    t_hidden = torch.randn(rows, 20, generator=gen, dtype=dtype)
    t_weight = torch.randn(t_vocab + pad, 20, generator=gen, dtype=dtype)
    return s_hidden, s_weight, t_hidden, t_weight


def reference_sum(s_hidden, s_weight, t_hidden, t_weight, s_vocab, t_vocab) -> torch.Tensor:
    z_s = F.linear(s_hidden, s_weight)  # padding columns too: the reference must cut them itself
    z_t = F.linear(t_hidden, t_weight)
    return sorted_l1_reference(z_s, z_t, s_vocab, t_vocab).sum()


@pytest.mark.parametrize("s_vocab,t_vocab", [(40, 70), (70, 40), (50, 50)])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 3 * 70])  # one chunk; three rows per chunk
def test_fused_equals_reference_float64(s_vocab, t_vocab, chunk_elements):
    s_hidden, s_weight, t_hidden, t_weight = heads(11, s_vocab, t_vocab)
    scale = 3.7  # an incoming gradient other than 1 must scale both gradients
    got = fused_head_sorted_l1(s_hidden, s_weight, s_vocab, t_vocab, t_hidden=t_hidden, t_weight=t_weight,
                               chunk_elements=chunk_elements)
    g_got = torch.autograd.grad(scale * got, (s_hidden, s_weight))
    want = reference_sum(s_hidden, s_weight, t_hidden, t_weight, s_vocab, t_vocab)
    g_want = torch.autograd.grad(scale * want, (s_hidden, s_weight))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_got[1][s_vocab:].abs().sum() == 0  # padding rows of the head get nothing
    assert g_got[1][:s_vocab].abs().sum() > 0


def test_gradcheck_float64():
    s_hidden, s_weight, t_hidden, t_weight = heads(3, 7, 9, pad=2, seed=1)

    def fn(h, w):
        return fused_head_sorted_l1(h, w, 7, 9, t_hidden=t_hidden, t_weight=t_weight, chunk_elements=2 * 9)

    assert torch.autograd.gradcheck(fn, (s_hidden, s_weight), eps=1e-7, atol=1e-6)


def test_teacher_as_logits_equals_teacher_as_head():
    s_hidden, s_weight, t_hidden, t_weight = heads(9, 30, 45)
    from_head = fused_head_sorted_l1(s_hidden, s_weight, 30, 45, t_hidden=t_hidden, t_weight=t_weight)
    g_head = torch.autograd.grad(from_head, (s_hidden, s_weight))
    logits = F.linear(t_hidden, t_weight)  # padding columns included: only the first t_vocab count
    from_logits = fused_head_sorted_l1(s_hidden, s_weight, 30, 45, t_logits=logits, chunk_elements=4 * 45)
    g_logits = torch.autograd.grad(from_logits, (s_hidden, s_weight))
    torch.testing.assert_close(from_logits, from_head, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_logits, g_head, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fp32_and_bf16_autocast_follow_the_reference():
    s_hidden, s_weight, t_hidden, t_weight = heads(16, 300, 400, dtype=torch.float32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = fused_head_sorted_l1(s_hidden, s_weight, 300, 400, t_hidden=t_hidden, t_weight=t_weight,
                                       chunk_elements=5 * 400)
            want = reference_sum(s_hidden, s_weight, t_hidden, t_weight, 300, 400)
        g_got = torch.autograd.grad(got, (s_hidden, s_weight))
        g_want = torch.autograd.grad(want, (s_hidden, s_weight))
        assert got.dtype == want.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_got)
        tol = 1e-2 if autocast else 1e-5  # bf16 gradient products (measured 2e-3 on the head, 0 on the rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        for a, b in zip(g_got, g_want, strict=True):
            assert float((a - b).norm()) <= tol * float(b.norm())
    # the bf16 products are really used (a path that ignored autocast would not see this difference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = fused_head_sorted_l1(s_hidden, s_weight, 300, 400, t_hidden=t_hidden, t_weight=t_weight)
    fp32 = fused_head_sorted_l1(s_hidden, s_weight, 300, 400, t_hidden=t_hidden, t_weight=t_weight)
    assert abs(float((bf16 - fp32).detach())) > 1e-5 * abs(float(fp32.detach()))


def test_peak_memory_is_one_chunk_not_the_whole_batch():
    rows, s_vocab, t_vocab = 256, 3000, 4000
    s_hidden, s_weight, t_hidden, t_weight = heads(rows, s_vocab, t_vocab, dtype=torch.float32)
    whole = rows * (s_vocab + t_vocab) * 4  # both sides' logits for all rows, what the dense path holds at least

    def fused():
        out = fused_head_sorted_l1(s_hidden, s_weight, s_vocab, t_vocab, t_hidden=t_hidden, t_weight=t_weight,
                                   chunk_elements=16 * t_vocab)
        out.backward()

    def dense():
        reference_sum(s_hidden, s_weight, t_hidden, t_weight, s_vocab, t_vocab).backward()

    gradients = s_weight.numel() * 4 + s_hidden.numel() * 4
    fused_peak = peak_bytes(fused)[1] - gradients
    dense_peak = peak_bytes(dense)[1] - gradients
    assert dense_peak > whole
    assert fused_peak < 0.25 * whole, (fused_peak, whole)


def test_bad_inputs_are_named():
    s_hidden, s_weight, t_hidden, t_weight = heads(4, 10, 12)
    with pytest.raises(ValueError, match="s_vocab"):
        fused_head_sorted_l1(s_hidden, s_weight, 99, 12, t_hidden=t_hidden, t_weight=t_weight)
    with pytest.raises(ValueError, match="t_hidden with t_weight, or as t_logits"):
        fused_head_sorted_l1(s_hidden, s_weight, 10, 12, t_hidden=t_hidden)
    with pytest.raises(ValueError, match="t_logits must be"):
        fused_head_sorted_l1(s_hidden, s_weight, 10, 12, t_logits=torch.zeros(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="detached"):
        fused_head_sorted_l1(s_hidden, s_weight, 10, 12, t_hidden=t_hidden, t_weight=t_weight.requires_grad_(True))


# ---- the method -------------------------------------------------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Records each call of the fused ULD op from the method: which teacher form it got."""
    calls: list = []
    original = uld_module.fused_head_sorted_l1

    def counted(*args, **kwargs):
        calls.append("head" if "t_weight" in kwargs else "logits")
        return original(*args, **kwargs)

    monkeypatch.setattr(uld_module, "fused_head_sorted_l1", counted)
    return calls


def run_uld(setup: Setup, tmp_path, mode: str, defer: tuple[bool, bool] = (True, True), bf16_autocast: bool = False):
    """(loss, parts, student parameter gradients) of one `uld` pass with `head_fusion: mode`."""
    return run_deferred(setup, tmp_path, "uld", {"head_fusion": mode, "kd_rate": 0.4}, defer, bf16_autocast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("teacher_deferred", [True, False])
def test_uld_fused_equals_dense(dtype, teacher_deferred, tmp_path, fused_calls):
    setup = Setup()
    setup.student.to(dtype)
    setup.teacher.to(dtype)
    assert setup.student.get_output_embeddings().weight.shape[0] > len(setup.s_tok)  # padding rows in the head
    dense = run_uld(setup, tmp_path, "dense", (True, teacher_deferred))
    assert fused_calls == []
    fused = run_uld(setup, tmp_path, "fused", (True, teacher_deferred))
    assert fused_calls == ["head" if teacher_deferred else "logits"]
    rtol = 1e-6 if dtype == torch.float64 else 2e-5  # the dense CE runs in fp32, the fused one in the input's dtype
    torch.testing.assert_close(fused[1]["uld"], dense[1]["uld"], rtol=1e-10 if dtype == torch.float64 else 1e-5,
                               atol=0)
    torch.testing.assert_close(fused[1]["ce"], dense[1]["ce"].to(fused[1]["ce"].dtype), rtol=rtol, atol=0)
    torch.testing.assert_close(fused[0], dense[0].to(fused[0].dtype), rtol=rtol, atol=0)
    assert fused[2].keys() == dense[2].keys() and dense[2]
    for name, grad in dense[2].items():
        assert float((fused[2][name] - grad).abs().max()) <= 1e-4 * float(grad.abs().max()), name


def test_uld_bf16_autocast_fused_follows_dense(tmp_path, fused_calls):
    check_bf16_fused_follows_dense(run_uld, tmp_path, fused_calls, ["head"])


def test_uld_dense_logit_views_and_auto_in_fp32_keep_the_dense_path(tmp_path, fused_calls):
    setup = Setup()
    run_uld(setup, tmp_path, "fused", (False, True))  # a student view with dense logits: nothing to fuse
    run_uld(setup, tmp_path, "auto")  # auto on a CPU in fp32/float64: dense
    assert fused_calls == []
    setup.student.float()
    setup.teacher.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts, _ = run_uld(setup, tmp_path, "auto")
    assert fused_calls == ["head"] and torch.isfinite(loss)


def test_uld_head_fusion_is_validated(tmp_path):
    with pytest.raises(OptionError, match="head_fusion"):
        build_method("uld", Setup().context(tmp_path), {"head_fusion": "chunked"})
