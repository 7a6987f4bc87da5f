"""KL family (docs/methods.md §3): values against naive Python loops, gradients against float64 autograd, memory."""

from __future__ import annotations

import math

import pytest
import torch
from _kd_helpers import one_thread

from dwakd.modules.divergences import (
    ALIASES,
    DIVERGENCES,
    divergence,
    resolve_divergence,
)

LAM, ALPHA = 0.1, 0.5


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one torch thread (restored afterwards)."""
    with one_thread():
        yield


def loop_divergence(student: list[float], teacher: list[float], kind: str, tau: float) -> float:
    """D(teacher → student) of one position by Python loops over the vocabulary (math module, float64)."""

    def softmax(z: list[float]) -> list[float]:
        top = max(z)
        e = [math.exp((v - top) / tau) for v in z]
        total = sum(e)
        return [v / total for v in e]

    q, p = softmax(student), softmax(teacher)
    V = len(q)
    kl = lambda a, b: sum(a[k] * (math.log(a[k]) - math.log(b[k])) for k in range(V) if a[k] > 0)  # noqa: E731
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "sfkl":
        return kl(p, [LAM * p[k] + (1 - LAM) * q[k] for k in range(V)])
    if kind == "srkl":
        return kl(q, [(1 - LAM) * p[k] + LAM * q[k] for k in range(V)])
    if kind == "js":
        mid = [(p[k] + q[k]) / 2 for k in range(V)]
        return 0.5 * kl(p, mid) + 0.5 * kl(q, mid)
    if kind == "akl":
        order = sorted(range(V), key=lambda k: p[k])
        cum = g_head = g_tail = 0.0
        for k in order:
            cum += p[k]
            if cum <= ALPHA:
                g_tail += abs(p[k] - q[k])
            else:
                g_head += abs(p[k] - q[k])
        return (g_head * kl(p, q) + g_tail * kl(q, p)) / (g_head + g_tail)
    raise ValueError(kind)


def dense_reference(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Straightforward dense float64 formulas (autograd follows them); AKL's gap weights detached as specified."""
    log_q = torch.log_softmax(student / tau, -1)
    log_p = torch.log_softmax(teacher / tau, -1)
    q, p = log_q.exp(), log_p.exp()
    fkl = (p * (log_p - log_q)).sum(-1)
    rkl = (q * (log_q - log_p)).sum(-1)
    if kind == "fkl":
        return fkl
    if kind == "rkl":
        return rkl
    if kind == "sfkl":
        return (p * (log_p - torch.log(LAM * p + (1 - LAM) * q))).sum(-1)
    if kind == "srkl":
        return (q * (log_q - torch.log((1 - LAM) * p + LAM * q))).sum(-1)
    if kind == "js":
        m = (p + q) / 2
        return 0.5 * (p * (log_p - m.log())).sum(-1) + 0.5 * (q * (log_q - m.log())).sum(-1)
    sorted_p, idx = p.sort(-1)
    gap = (sorted_p - q.gather(-1, idx)).abs().detach()
    tail = sorted_p.cumsum(-1) <= ALPHA
    g_tail, g_head = (gap * tail).sum(-1), (gap * ~tail).sum(-1)
    return (g_head * fkl + g_tail * rkl) / (g_head + g_tail)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_values_match_python_loops(kind: str, tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 2
    got = divergence(student, teacher, kind, tau, chunk_elements=10)  # chunks of 1 row: exercises the loop
    assert got.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            want = loop_divergence(student[b, i].tolist(), teacher[b, i].tolist(), kind, tau)
            assert got[b, i].item() == pytest.approx(want, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradients_match_dense_autograd(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    student = (torch.randn(5, 9, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 3
    weights = torch.rand(5, generator=gen, dtype=torch.float64)  # a per-position weighting, as DWA-KD does
    (grad,) = torch.autograd.grad((divergence(student, teacher, kind, 2.0, chunk_elements=20) * weights).sum(), student)
    (want,) = torch.autograd.grad((dense_reference(student, teacher, kind, 2.0) * weights).sum(), student)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in DIVERGENCES if k != "akl"])  # AKL's mixing weights carry no gradient
def test_gradcheck(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: divergence(s, teacher, kind, 1.5, chunk_elements=6), (student,))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_row_selection_equals_gathering_first(kind: str) -> None:
    """Picking rows by index (no copy) equals gathering them first; unselected rows get zero gradient."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(4, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, 11, generator=gen, dtype=torch.float64)
    s_rows = torch.tensor([0, 3, 7, 19])
    t_rows = torch.tensor([2, 5, 11, 23])
    got = divergence(student, teacher, kind, 2.0, student_rows=s_rows, teacher_rows=t_rows, chunk_elements=22)
    gathered = divergence(student.reshape(-1, 11)[s_rows], teacher.reshape(-1, 11)[t_rows], kind, 2.0)
    torch.testing.assert_close(got, gathered, rtol=0, atol=1e-14)
    (grad,) = torch.autograd.grad(got.sum(), student)
    flat = grad.reshape(-1, 11)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[s_rows] = False
    assert torch.all(flat[untouched] == 0) and torch.all(flat[s_rows].abs().sum(-1) > 0)


def test_forward_saves_only_its_inputs() -> None:
    """No (positions, vocab) intermediate is kept for backward: the only saved tensors are the inputs themselves."""
    student = torch.randn(64, 500, requires_grad=True)
    teacher = torch.randn(64, 500)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    for kind in DIVERGENCES:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            divergence(student, teacher, kind, 2.0, chunk_elements=4000).sum().backward()
        big = [t for t in saved if t.numel() >= 500]
        assert {t.data_ptr() for t in big} == {student.data_ptr(), teacher.data_ptr()}, kind
        assert len(big) == 2, kind
    saved.clear()  # the check can fail: a plain autograd formula keeps several (positions, vocab) tensors
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_reference(student, teacher, "fkl", 2.0).sum()
    assert len([t for t in saved if t.numel() >= 500]) > 2


def test_identical_distributions_give_zero_and_half_precision_runs_in_fp32() -> None:
    z = torch.randn(4, 13)
    for kind in DIVERGENCES:
        assert divergence(z, z, kind, 2.0).abs().max().item() < 1e-6
    s, t = torch.randn(6, 13).bfloat16().requires_grad_(), torch.randn(6, 13).bfloat16()
    out = divergence(s, t, "fkl", 2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, divergence(s.detach().float(), t.float(), "fkl", 2.0))
    out.sum().backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_names_and_errors() -> None:
    for alias, short in ALIASES.items():
        assert resolve_divergence(alias) == short
    with pytest.raises(ValueError, match="unknown divergence"):
        resolve_divergence("kl")
    with pytest.raises(ValueError, match="detach"):
        divergence(torch.randn(2, 3), torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="vocabulary axis"):
        divergence(torch.randn(2, 3), torch.randn(2, 4))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_tokens_ruled_out_with_minus_inf(kind: str) -> None:
    """Tokens both sides rule out (−inf logits, e.g. a masked vocabulary) contribute 0·log 0 = 0, not NaN."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    student[:, [2, 5]] = teacher[:, [2, 5]] = -math.inf
    student.requires_grad_()
    got = divergence(student, teacher, kind, 2.0)
    for i in range(3):
        want = loop_divergence(student[i].tolist(), teacher[i].tolist(), kind, 2.0)
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(grad).all() and torch.all(grad[:, [2, 5]] == 0)


def test_bf16_autocast_does_not_lower_the_precision_of_fp32_inputs() -> None:
    s, t = torch.randn(6, 300, requires_grad=True), torch.randn(6, 300)
    plain = divergence(s, t, "js", 2.0)
    (plain_grad,) = torch.autograd.grad(plain.sum(), s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = divergence(s, t, "js", 2.0)
        (autocast_grad,) = torch.autograd.grad(autocast.sum(), s)
    assert torch.equal(plain, autocast) and torch.equal(plain_grad, autocast_grad)


@pytest.mark.parametrize("kind", ["rkl", "js"])
def test_plain_chunks_are_freed_before_the_next_one(kind):
    """The plain chunked path (every divergence but CPU fp32 forward KL) holds one chunk's temporaries at a time:
    beside the gradient, three chunks of 32 rows peak at a third of what one chunk of all 96 rows holds (loop
    variables keeping the previous chunk's inputs and gradient made it one 32-row chunk more)."""
    from dwakd.evaluation.memory import peak_bytes

    rows, vocab = 96, 4000
    g = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(rows, vocab, generator=g)

    def temporaries(chunk_rows: int) -> int:
        def run():
            divergence(student, teacher, kind, 2.0, chunk_elements=chunk_rows * vocab).sum().backward()
            student.grad = None

        return peak_bytes(run)[1] - rows * vocab * 4  # above the (rows, vocab) gradient

    chunk = 32 * vocab * 4
    assert temporaries(32) < temporaries(rows) / 3 + chunk / 2, (temporaries(32), temporaries(rows), chunk)
