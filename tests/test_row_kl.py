"""The numba forward-KL rows (`dwakd.ops.row_kl`) behind `modules.divergences.divergence` on float32 CPU logits,
against float64 (the plain path computed in float64) and against the plain float32 path they replace."""

from __future__ import annotations

import pytest
import torch
from _kd_helpers import one_thread

from dwakd.modules import divergences
from dwakd.ops import row_kl


def _value_and_grad(student: torch.Tensor, teacher: torch.Tensor, tau: float, **rows) -> tuple:
    """Per-row values and the gradient of Σ_k k·value_k w.r.t. the student logits."""
    leaf = student.detach().clone().requires_grad_(True)
    values = divergences.divergence(leaf, teacher, "fkl", tau, **rows)
    weights = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    (values * weights).sum().backward()
    return values.detach(), leaf.grad


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got − want| / |want| (want in float64)."""
    return float(((got.double() - want).abs() / want.abs()).max())


def _plain(monkeypatch, *args, **kwargs) -> tuple:
    with monkeypatch.context() as patch:
        patch.setattr(row_kl, "fkl_rows_applies", lambda *a: False)
        return _value_and_grad(*args, **kwargs)


@pytest.mark.parametrize(("vocab", "tau"), [(50257, 2.0), (9001, 1.0), (37, 0.5)])
@pytest.mark.parametrize("selected", [False, True])
def test_fast_rows_match_float64(vocab: int, tau: float, selected: bool, monkeypatch) -> None:
    """Values within 2e-6 (relative) of float64 or no further from it than the plain float32 path they replace
    (on AVX2 the kernel's 8-lane sums reach 5.9e-6 at V = 9,001, where the plain path is 2.3e-5 off); gradients
    likewise, relative to their largest entry (5.3e-6 there, for both paths)."""
    g = torch.Generator().manual_seed(vocab)
    student = torch.randn(24, vocab, generator=g) * 3
    teacher = torch.randn(24, vocab, generator=g) * 4
    rows = {}
    if selected:
        rows = {"student_rows": torch.tensor([3, 5, 7, 0, 23, 12]), "teacher_rows": torch.tensor([1, 2, 3, 4, 5, 9])}
    assert row_kl.fkl_rows_applies(student, teacher)
    got, got_grad = _value_and_grad(student, teacher, tau, **rows)
    want, want_grad = _value_and_grad(student.double(), teacher.double(), tau, **rows)  # float64: the plain path
    assert got.dtype == torch.float32
    plain, plain_grad = _plain(monkeypatch, student, teacher, tau, **rows)
    assert _max_rel_err(got, want) <= max(2e-6, _max_rel_err(plain, want))

    def grad_err(grad: torch.Tensor) -> float:  # relative to the largest entry
        return float((grad.double() - want_grad).abs().max() / want_grad.abs().max())

    assert grad_err(got_grad) <= max(2e-6, grad_err(plain_grad))
    if selected:  # rows not selected get no gradient
        untouched = torch.ones(24, dtype=torch.bool)
        untouched[rows["student_rows"]] = False
        assert got_grad[untouched].abs().max() == 0


def test_fast_rows_agree_with_the_plain_float32_path(monkeypatch) -> None:
    """The fast path replaces the plain fp32 one: both close to each other (and, above, to float64)."""
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(16, 4000, generator=g) * 2, torch.randn(16, 4000, generator=g) * 5
    fast, fast_grad = _value_and_grad(student, teacher, 2.0)
    plain, plain_grad = _plain(monkeypatch, student, teacher, 2.0)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-7)


def test_far_tails_and_a_teacher_the_student_rules_out() -> None:
    """Teacher mass where the student's logit is 200 below its maximum (q < 2^−125 relative): the value counts the
    full log-ratio (not the clamped exponent), as float64 does."""
    student = torch.zeros(2, 64)
    teacher = torch.zeros(2, 64)
    student[:, 5] = -200.0
    teacher[0, 5] = 3.0
    got, _ = _value_and_grad(student, teacher, 1.0)
    want, _ = _value_and_grad(student.double(), teacher.double(), 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got[1] > 3.0  # ≈ (200 − log 64)/64: a clamped exponent would give ≈ 125·ln 2 / 64 ≈ 1.4


def test_non_finite_rows_take_the_plain_path(monkeypatch) -> None:
    """A row with −inf, +inf or NaN on either side is computed exactly as the plain path does (its −inf clamping,
    NaN propagation); the other rows still use the kernel."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(6, 300, generator=g), torch.randn(6, 300, generator=g)
    student[1, 7] = float("-inf")
    teacher[2, 9] = float("-inf")
    teacher[3, 0] = float("nan")
    student[4, 2] = float("inf")
    fast, fast_grad = _value_and_grad(student, teacher, 2.0)
    plain, plain_grad = _plain(monkeypatch, student, teacher, 2.0)
    for row in (1, 2, 3, 4):
        torch.testing.assert_close(fast[row], plain[row], equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(fast_grad[row], plain_grad[row], equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(fast[3])
    torch.testing.assert_close(fast[[0, 5]], plain[[0, 5]], rtol=1e-5, atol=1e-6)


def test_threads_and_empty_selections() -> None:
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(40, 30000, generator=g), torch.randn(40, 30000, generator=g) * 2
    two, two_grad = _value_and_grad(student, teacher, 2.0)
    with one_thread():
        one, one_grad = _value_and_grad(student, teacher, 2.0)
    torch.testing.assert_close(two, one, rtol=0, atol=0)  # rows are split, never a row's sums
    torch.testing.assert_close(two_grad, one_grad, rtol=0, atol=0)
    empty = torch.zeros(0, dtype=torch.long)
    values, grad = _value_and_grad(student, teacher, 2.0, student_rows=empty, teacher_rows=empty)
    assert values.shape == (0,) and grad.abs().max() == 0


def test_other_dtypes_and_kinds_keep_the_plain_path() -> None:
    x = torch.randn(3, 10)
    assert not row_kl.fkl_rows_applies(x.double(), x.double())
    assert not row_kl.fkl_rows_applies(x.bfloat16(), x)
    assert not row_kl.fkl_rows_applies(x.t(), x.t())  # last axis not contiguous
    assert row_kl.fkl_rows_applies(torch.randn(3, 20)[:, :10], x)  # a column slice keeps unit stride


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.5])
def test_statistics_in_the_same_pass_match_float64(tau: float) -> None:
    """τ = 1 entropies and peaks of either side, from the KL's own pass, against float64 (`ops.row_stats`'s
    reference on float64 rows); a side not asked for is not returned; a non-finite row gets the plain statistics.
    A peak is within 2e-6 (relative) of float64 or no further from it than torch's float32 softmax (on AVX2 both
    are 2.25e-6 off at a teacher row whose log-normaliser is ≈ 25, where one float32 ulp is 1.9e-6)."""
    from dwakd.ops.row_stats import row_entropy_peak

    g = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(30, 20000, generator=g) * 2, torch.randn(30, 20000, generator=g) * 6
    teacher[4, 3] = float("-inf")  # a row for the plain path (its statistics: row_stats, −inf counts as p = 0)
    rows = {"student_rows": torch.tensor([2, 4, 6, 8, 29]), "teacher_rows": torch.tensor([1, 4, 9, 0, 29])}
    names = ("student_entropy", "student_peak", "teacher_entropy", "teacher_peak")
    values, stats = divergences.divergence_and_statistics(student, teacher, "fkl", tau, names, **rows)
    assert values.shape == (5,) and set(stats) == set(names)
    sides = (("student", (student, rows["student_rows"])), ("teacher", (teacher, rows["teacher_rows"])))
    for side, (x, picked) in sides:
        entropy, peak = row_entropy_peak(x.double(), picked)
        torch.testing.assert_close(stats[f"{side}_entropy"].double(), entropy, rtol=2e-6, atol=2e-6)
        plain_peak = torch.softmax(x[picked], dim=-1).amax(dim=-1)  # float32
        assert _max_rel_err(stats[f"{side}_peak"], peak) <= max(2e-6, _max_rel_err(plain_peak, peak))
    only, named = divergences.divergence_and_statistics(student, teacher, "fkl", tau, ("teacher_entropy",), **rows)
    assert set(named) == {"teacher_entropy"}
    torch.testing.assert_close(named["teacher_entropy"], stats["teacher_entropy"], rtol=0, atol=0)
    torch.testing.assert_close(only, values, rtol=0, atol=0)  # the statistics do not touch the value


@pytest.mark.parametrize("tau", [2.0, 1.0, 3.0])
def test_statistics_of_rows_with_far_tails(tau: float) -> None:
    """At τ = 2 the τ = 1 exponentials are the KL's own squared, floored at 2^−124 so no subnormal is formed; rows
    whose entries reach 10^−300 of their largest (logits spread over ±180) still give float64's entropy and peak."""
    from dwakd.ops.row_stats import row_entropy_peak

    g = torch.Generator().manual_seed(13)
    student, teacher = torch.randn(8, 5000, generator=g) * 60, torch.randn(8, 5000, generator=g) * 60
    teacher[:, :5] += 200.0  # a few dominant entries, the rest far below 2^−62 of them
    names = ("student_entropy", "student_peak", "teacher_entropy", "teacher_peak")
    _, stats = divergences.divergence_and_statistics(student, teacher, "fkl", tau, names)
    for side, x in (("student", student), ("teacher", teacher)):
        entropy, peak = row_entropy_peak(x.double())
        torch.testing.assert_close(stats[f"{side}_entropy"].double(), entropy, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(stats[f"{side}_peak"].double(), peak, rtol=2e-6, atol=0)


def test_statistics_on_the_plain_path_and_unknown_names(monkeypatch) -> None:
    g = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(5, 700, generator=g), torch.randn(5, 700, generator=g) * 3
    fast = divergences.divergence_and_statistics(student, teacher, "fkl", 2.0, ("student_entropy", "teacher_peak"))[1]
    with monkeypatch.context() as patch:
        patch.setattr(row_kl, "fkl_rows_applies", lambda *a: False)
        plain = divergences.divergence_and_statistics(student, teacher, "fkl", 2.0,
                                                      ("student_entropy", "teacher_peak"))[1]
    srkl = divergences.divergence_and_statistics(student, teacher, "srkl", 2.0, ("student_entropy", "teacher_peak"))[1]
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(srkl[name], plain[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown statistics"):
        divergences.divergence_and_statistics(student, teacher, "fkl", 2.0, ("entropy",))


def test_token_weighted_rows_add_no_temporary_at_the_backward_peak() -> None:
    """Σ_k u_k·KL_k (DWA-KD's teacher-space term) peaks no higher than DSKD's plain Σ_k KL_k: the kernel scales by
    dL/dKL_k as it comes, where a (K,) coefficient dL/dKL / τ formed next to the weighted sum's own per-row gradient
    made the weighted backward K floats more (1 KiB here) at the (rows, V) gradient's peak."""
    from dwakd.evaluation.memory import peak_bytes

    rows, vocab = 256, 3000
    g = torch.Generator().manual_seed(3)
    student = torch.randn(rows, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(rows, vocab, generator=g)
    weights = torch.rand(rows, generator=g)
    assert row_kl.fkl_rows_applies(student, teacher)

    def peak(weighted: bool) -> int:
        def run():
            values = divergences.divergence(student, teacher, "fkl", 2.0)
            (values * weights if weighted else values).sum().backward()
            student.grad = None

        return peak_bytes(run)[1]

    plain, weighted = peak(False), peak(True)
    assert plain >= rows * vocab * 4
    assert weighted <= plain, (weighted, plain)
