"""ALM's fused LM head + label log-probabilities (`fused_head_label_log_probs`) against its plain reference (F.linear
logits, log-softmax, autograd), and `alm` with `head_fusion: fused` against `dense`: values and gradients of the
hidden rows and the head (with padding rows), with and without a space set, chunking, incoming gradients on both
outputs, fp32 and bf16 autocast, the op's peak memory, input errors and the option."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import Setup, check_bf16_fused_follows_dense, run_deferred
from _kd_helpers import one_thread

import dwakd.methods.alm as alm_module
from dwakd.evaluation.memory import peak_bytes
from dwakd.methods import build_method
from dwakd.methods.base import OptionError
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
    assert fused_peak - gradients < 0.25 * whole, (fused_peak, gradients, whole)  # measured: 2 chunks, 0.127


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


# ---- the method -------------------------------------------------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Records each call of the fused op from `alm`: "grad" for the student side, "no_grad" for the teacher."""
    calls: list = []
    original = alm_module.fused_head_label_log_probs

    def counted(*args, **kwargs):
        calls.append("grad" if torch.is_grad_enabled() else "no_grad")
        return original(*args, **kwargs)

    monkeypatch.setattr(alm_module, "fused_head_label_log_probs", counted)
    return calls


def run_alm(setup: Setup, tmp_path, mode: str, defer: tuple[bool, bool] = (True, True), bf16_autocast: bool = False,
            **options):
    """(loss, parts, student parameter gradients) of one `alm` pass with `head_fusion: mode`."""
    torch.manual_seed(0)  # the same initial latent projector on every call
    return run_deferred(setup, tmp_path, "alm", {"head_fusion": mode, "kd_rate": 0.4, **options}, defer, bf16_autocast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("teacher_deferred,latents", [(True, False), (False, False), (True, True)])
def test_alm_fused_equals_dense(dtype, teacher_deferred, latents, tmp_path, fused_calls):
    setup = Setup()
    setup.student.to(dtype)
    setup.teacher.to(dtype)
    assert setup.student.get_output_embeddings().weight.shape[0] > len(setup.s_tok)  # padding rows in the head
    options = {"latents": latents, "chunk_weight": "teacher_tokens"}
    dense = run_alm(setup, tmp_path, "dense", (True, teacher_deferred), **options)
    assert fused_calls == []
    fused = run_alm(setup, tmp_path, "fused", (True, teacher_deferred), **options)
    assert fused_calls == (["grad", "no_grad"] if teacher_deferred else ["grad"])  # a teacher with logits: dense
    assert fused[1].keys() == dense[1].keys() == {"ce", "alm"} | ({"latents"} if latents else set())
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, value in dense[1].items():
        torch.testing.assert_close(fused[1][name], value, rtol=rtol, atol=0)
    torch.testing.assert_close(fused[0], dense[0], rtol=rtol, atol=0)
    assert fused[2].keys() == dense[2].keys() and dense[2]
    for name, grad in dense[2].items():
        assert float((fused[2][name] - grad).abs().max()) <= (1e-9 if dtype == torch.float64 else 1e-4) \
            * float(grad.abs().max()), name


def test_alm_bf16_autocast_fused_follows_dense(tmp_path, fused_calls):
    check_bf16_fused_follows_dense(run_alm, tmp_path, fused_calls, ["grad", "no_grad"])


def test_alm_dense_logit_views_and_auto_in_fp32_keep_the_dense_path(tmp_path, fused_calls):
    setup = Setup()
    run_alm(setup, tmp_path, "fused", (False, False))  # views with dense logits: nothing to fuse
    run_alm(setup, tmp_path, "auto")  # auto on a CPU in fp32/float64: dense
    assert fused_calls == []
    setup.student.float()
    setup.teacher.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = run_alm(setup, tmp_path, "auto")
    assert fused_calls == ["grad", "no_grad"] and torch.isfinite(loss) and grads


def test_alm_head_fusion_is_validated(tmp_path):
    with pytest.raises(OptionError, match="head_fusion"):
        build_method("alm", Setup().context(tmp_path), {"head_fusion": "chunked"})
