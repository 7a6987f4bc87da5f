"""The KL family, per position, chunked over tokens so no (tokens, vocab) temporaries pile up.

docs/methods.md#3-kl-family-divergences.

With p = softmax(teacher / τ) and q = softmax(student / τ), each divergence returns one value per position so
that token weights can multiply it before the caller sums. Names (aliases from DSKD's `--kd-objective` work too):

- ``fkl``  forward KL   Σ p (log p − log q)
- ``rkl``  reverse KL   Σ q (log q − log p)
- ``sfkl`` skewed forward KL, λ = 0.1:  Σ p (log p − log(λp + (1−λ)q))
- ``srkl`` skewed reverse KL, λ = 0.1:  Σ q (log q − log((1−λ)p + λq))
- ``js``   Jensen–Shannon  ½ KL(p‖M) + ½ KL(q‖M), M = (p + q)/2
- ``akl``  adaptive KL, α = 0.5:  (g_head·FKL + g_tail·RKL) / (g_head + g_tail), where, with the teacher's
  probabilities sorted ascending, the tail is the tokens whose cumulative teacher mass is ≤ α, and g_head / g_tail
  are the summed |p − q| gaps on the head / tail (the gap weights carry no gradient, as in DSKD and Wu et al. 2024).

Memory: a custom autograd function evaluates the value in chunks of rows and recomputes each chunk in backward,
so it keeps nothing alive but its inputs; the only full-size tensor it creates is the gradient of the student
logits. Rows can be picked from a larger tensor by index (`student_rows`, `teacher_rows`), which lets callers
pass the full (batch·length, rows) logits and compute at valid positions only, without gathering a copy first.
No τ² factor (docs/methods.md#22-ce-and-kd-mix-and-temperature). Gradients flow to the student argument only;
the teacher argument is a fixed target.

Forward KL on float32 CPU logits runs as numba row kernels instead (`dwakd.ops.row_kl`: no (rows, vocab)
temporaries at all, 8-20× faster on 151k-token rows), which can also return either side's τ = 1 entropy and peak
from the same pass (`divergence_and_statistics`, for DWA-KD's token weights); the chunked PyTorch path here is their
reference and serves every other case.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from dwakd.ops import row_kl
from dwakd.ops.row_math import (
    CHUNK_ELEMENTS,
    chunk_rows,
    compute_dtype,
    iter_row_chunks,
    log_probs,
    no_autocast,
    row_dot,
)
from dwakd.ops.row_stats import row_entropy_peak
from dwakd.options import OptionError

DIVERGENCES = ("fkl", "rkl", "sfkl", "srkl", "js", "akl")
ALIASES = {
    "forward_kl": "fkl",
    "reverse_kl": "rkl",
    "skewed_forward_kl": "sfkl",
    "skewed_reverse_kl": "srkl",
    "js_divergence": "js",
    "adaptive_kl": "akl",
}
STATISTICS = ("student_entropy", "student_peak", "teacher_entropy", "teacher_peak")


def resolve_divergence(name: str) -> str:
    """Canonical short name for `name` (accepts DSKD's long names); raises with the valid choices otherwise."""
    key = ALIASES.get(name, name)
    if key not in DIVERGENCES:
        choices = f"{', '.join(DIVERGENCES)} (or {', '.join(ALIASES)})"
        raise ValueError(f"unknown divergence {name!r}; choose one of {choices}")
    return key


def check_divergence(option: str, name: str) -> None:
    """Raise `OptionError` naming `method.options.<option>` unless `name` is a known divergence (for options)."""
    try:
        resolve_divergence(name)
    except ValueError as exc:
        raise OptionError(option, str(exc)) from None


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., vocab) -> (rows, vocab) view (a copy only if `x` is not viewable)."""
    return x.reshape(-1, x.shape[-1])


@dataclass(frozen=True)
class _Spec:
    """Which divergence and its constants, passed through the autograd function."""

    kind: str
    temperature: float
    skew_lambda: float
    akl_alpha: float
    chunk: int


def softmax_vjp_(q: torch.Tensor, a: torch.Tensor, q_dot_a: torch.Tensor | None = None) -> torch.Tensor:
    """∂/∂s of f(q = softmax(s)) given a = ∂f/∂q: q ⊙ (a − ⟨q, a⟩), computed in place in `a`.

    `q_dot_a`: ⟨q, a⟩ when the caller has it already (often the divergence value itself)."""
    inner = row_dot(q, a) if q_dot_a is None else q_dot_a
    return a.sub_(inner.unsqueeze(-1)).mul_(q)


def akl_mix(p: torch.Tensor, q: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and tail mixing weights (rows,) of adaptive KL; ½/½ where p and q coincide (no gap at all).

    With the target probabilities sorted ascending, the tail is the tokens whose cumulative mass is ≤ α; the
    weights are the summed |p − q| gaps on the head and on the tail, normalised to sum to 1.
    """
    sorted_p, order = p.sort(-1)  # ascending teacher probabilities
    gap = (sorted_p - q.gather(-1, order)).abs_()
    tail = sorted_p.cumsum_(-1).le_(alpha)
    g_tail = row_dot(gap, tail.to(gap.dtype))
    g_head = gap.sum(-1) - g_tail
    total = g_head + g_tail
    safe = total.clamp_min(torch.finfo(total.dtype).tiny)
    half = torch.full_like(total, 0.5)
    return torch.where(total > 0, g_head / safe, half), torch.where(total > 0, g_tail / safe, half)


def _value(s: torch.Tensor, t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Per-row divergence (rows,) of teacher logits t → student logits s (both unscaled, at least fp32)."""
    kind, lam, tau = spec.kind, spec.skew_lambda, spec.temperature
    log_q, log_p = log_probs(s, tau), log_probs(t, tau)
    if kind == "fkl":
        return row_dot(log_p.exp(), log_p.sub_(log_q))
    if kind == "rkl":
        return row_dot(log_q.exp(), log_q.sub_(log_p))
    if kind == "sfkl":
        log_m = torch.logaddexp(log_p + math.log(lam), log_q + math.log1p(-lam)) if lam > 0 else log_q
        return row_dot(log_p.exp(), log_p - log_m)
    if kind == "srkl":
        log_m = torch.logaddexp(log_p + math.log1p(-lam), log_q + math.log(lam)) if lam > 0 else log_p
        return row_dot(log_q.exp(), log_q - log_m)
    if kind == "js":
        log_mid = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
        return 0.5 * row_dot(log_p.exp(), log_p - log_mid) + 0.5 * row_dot(log_q.exp(), log_q - log_mid)
    if kind == "akl":
        p, q = log_p.exp(), log_q.exp()
        w_head, w_tail = akl_mix(p, q, spec.akl_alpha)
        diff = log_p.sub_(log_q)  # log p − log q
        return w_head * row_dot(p, diff) - w_tail * row_dot(q, diff)
    raise ValueError(kind)  # pragma: no cover - resolve_divergence guards this


def _grad(s: torch.Tensor, t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Gradient (rows, vocab) of the per-row divergence w.r.t. the *scaled* student logits s / τ."""
    kind, lam, tau = spec.kind, spec.skew_lambda, spec.temperature
    log_q, log_p = log_probs(s, tau), log_probs(t, tau)
    q = log_q.exp()
    if kind == "fkl":
        return q.sub_(log_p.exp_())  # q − p
    if kind == "rkl":
        return softmax_vjp_(q, log_q.sub_(log_p))  # the "+1" of ∂(q log q)/∂q cancels in the softmax Jacobian
    if kind == "sfkl":
        log_m = torch.logaddexp(log_p + math.log(lam), log_q + math.log1p(-lam)) if lam > 0 else log_q
        return softmax_vjp_(q, log_p.sub_(log_m).exp_().mul_(-(1.0 - lam)))  # ∂/∂q = −(1−λ) p/m
    if kind == "srkl":
        log_m = torch.logaddexp(log_p + math.log1p(-lam), log_q + math.log(lam)) if lam > 0 else log_p
        ratio = (log_q - log_m).exp_().mul_(lam)  # λ q/m
        return softmax_vjp_(q, log_q.sub_(log_m).sub_(ratio))  # ∂/∂q = log q − log m + 1 − λ q/m
    if kind == "js":
        log_mid = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
        return softmax_vjp_(q, log_q.sub_(log_mid).mul_(0.5))  # p/M and q/M terms cancel: (p + q)/(2M) = 1
    if kind == "akl":
        p = log_p.exp()
        w_head, w_tail = akl_mix(p, q, spec.akl_alpha)
        rkl_grad = softmax_vjp_(q, log_q.sub_(log_p))
        return rkl_grad.mul_(w_tail.unsqueeze(-1)).add_((q - p).mul_(w_head.unsqueeze(-1)))
    raise ValueError(kind)  # pragma: no cover


def _plain_statistics(student: torch.Tensor, teacher: torch.Tensor, student_rows: torch.Tensor | None,
                      teacher_rows: torch.Tensor | None, want: tuple[bool, bool], dtype: torch.dtype) -> torch.Tensor:
    """(4, K) τ = 1 statistics of the selected rows from `ops.row_stats`: student entropy and peak, teacher entropy
    and peak; a side not asked for is 0."""
    total = student.shape[0] if student_rows is None else student_rows.numel()
    stats = torch.zeros(4, total, dtype=dtype, device=student.device)
    for side, (x, rows) in enumerate(((student, student_rows), (teacher, teacher_rows))):
        if want[side]:
            entropy, peak = row_entropy_peak(x, rows, x.shape[-1])
            stats[2 * side], stats[2 * side + 1] = entropy.to(stats), peak.to(stats)
    return stats


def _pick(rows: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The entries `keep` (positions into the selection) of a row selection; `rows` None selects every row."""
    return keep if rows is None else rows.index_select(0, keep)


class _KLFamily(torch.autograd.Function):
    """Chunked per-row divergence; backward recomputes each chunk instead of saving intermediates.

    Forward KL on float32 CPU logits takes the numba row kernels of `dwakd.ops.row_kl` (no (rows, V) temporaries;
    they keep four floats per row for backward); a row with a non-finite entry, and every other case, takes the
    plain chunked path below, which is also their reference.
    """

    @staticmethod
    def forward(ctx, student, teacher, student_rows, teacher_rows, spec, want):  # type: ignore[override]
        want_s, want_t = want
        ctx.fast = None
        if spec.kind == "fkl" and row_kl.fkl_rows_applies(student, teacher):
            out, bad, saved, stats = row_kl.fkl_rows_forward(student, teacher, student_rows, teacher_rows,
                                                             spec.temperature, want_s, want_t)
            ctx.fast = saved
            slow = bad.nonzero().squeeze(1)
            if slow.numel():
                rows_s, rows_t = _pick(student_rows, slow), _pick(teacher_rows, slow)
                out[slow] = _KLFamily._plain_values(student, teacher, rows_s, rows_t, spec)
                stats[:, slow] = _plain_statistics(student, teacher, rows_s, rows_t, want, stats.dtype)
            ctx.slow = slow
        else:
            out = _KLFamily._plain_values(student, teacher, student_rows, teacher_rows, spec)
            stats = _plain_statistics(student, teacher, student_rows, teacher_rows, want, out.dtype)
        ctx.save_for_backward(student, teacher, student_rows, teacher_rows)
        ctx.spec = spec
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def _plain_values(student, teacher, student_rows, teacher_rows, spec) -> torch.Tensor:
        total = student.shape[0] if student_rows is None else student_rows.numel()
        out = torch.empty(total, dtype=compute_dtype(student), device=student.device)  # (positions,)
        t_chunks = iter_row_chunks(teacher, teacher_rows, spec.chunk)
        s_chunks = iter_row_chunks(student, student_rows, spec.chunk)
        with no_autocast(student):
            for (start, end, s), (_, _, t) in zip(s_chunks, t_chunks, strict=True):
                out[start:end] = _value(s, t, spec)
                del s, t  # before the next chunk is formed (see `_plain_grads`)
        return out

    @staticmethod
    def _plain_grads(grad, student, teacher, student_rows, teacher_rows, grad_out, spec) -> None:
        """Write the selected rows' gradients into `grad` (rows not selected are left as they are)."""
        tau = spec.temperature
        t_chunks = iter_row_chunks(teacher, teacher_rows, spec.chunk)
        s_chunks = iter_row_chunks(student, student_rows, spec.chunk)
        with no_autocast(student):
            for (start, end, s), (_, _, t) in zip(s_chunks, t_chunks, strict=True):
                g = _grad(s, t, spec).mul_(grad_out[start:end].to(s.dtype).unsqueeze(-1) / tau)
                if student_rows is None:
                    grad[start:end] = g.to(grad.dtype)
                else:
                    grad.index_copy_(0, student_rows[start:end], g.to(grad.dtype))
                # loop variables would keep this chunk's inputs and gradient alive while the next chunk is formed
                del s, t, g

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):  # type: ignore[override]
        student, teacher, student_rows, teacher_rows = ctx.saved_tensors
        spec: _Spec = ctx.spec
        if not ctx.needs_input_grad[0] or grad_out is None:
            return None, None, None, None, None, None
        # (rows, vocab) gradient of the student input; rows not selected get zero
        grad = torch.zeros_like(student) if student_rows is not None else torch.empty_like(student)
        if ctx.fast is None:
            _KLFamily._plain_grads(grad, student, teacher, student_rows, teacher_rows, grad_out, spec)
            return grad, None, None, None, None, None
        row_kl.fkl_rows_backward(student, teacher, student_rows, teacher_rows, spec.temperature, grad_out, ctx.fast,
                                 grad)
        slow = ctx.slow
        if slow.numel():  # rows with a non-finite entry: the plain path's gradient replaces the kernel's
            rows = slow if student_rows is None else student_rows.index_select(0, slow)
            _KLFamily._plain_grads(grad, student, teacher, rows, _pick(teacher_rows, slow), grad_out[slow], spec)
        return grad, None, None, None, None, None


def divergence_and_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    statistics: Collection[str] = (),
    *,
    student_rows: torch.Tensor | None = None,
    teacher_rows: torch.Tensor | None = None,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`divergence(...)` and, per position, the τ = 1 statistics named in `statistics` (from `STATISTICS`: the
    entropy in nats or the peak probability of softmax(student logits) or softmax(teacher logits), over the
    inputs' whole last axis, no gradient). Forward KL on float32 CPU logits computes them in the divergence's own
    pass (`dwakd.ops.row_kl`); every other case with `dwakd.ops.row_stats` on the same rows."""
    kind = resolve_divergence(kind)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher logits must share the vocabulary axis, got {student_logits.shape[-1]} "
            f"and {teacher_logits.shape[-1]} (slice both to the same vocab_size first)"
        )
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("the teacher distribution is a fixed target here: pass teacher_logits.detach()")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= skew_lambda < 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1), got {skew_lambda}")
    lead_shape = student_logits.shape[:-1]
    student = flat_rows(student_logits)
    teacher = flat_rows(teacher_logits)
    n_student = student.shape[0] if student_rows is None else student_rows.numel()
    n_teacher = teacher.shape[0] if teacher_rows is None else teacher_rows.numel()
    if n_student != n_teacher:
        raise ValueError(f"student and teacher select different numbers of positions: {n_student} vs {n_teacher}")
    chunk = chunk_rows(student.shape[-1], chunk_elements)
    spec = _Spec(kind, float(temperature), float(skew_lambda), float(akl_alpha), chunk)
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {STATISTICS}")
    want = (any(n.startswith("student") for n in statistics), any(n.startswith("teacher") for n in statistics))
    values, stats = _KLFamily.apply(student, teacher, student_rows, teacher_rows, spec, want)
    named = {name: stats[i] for i, name in enumerate(STATISTICS) if name in statistics}
    if student_rows is None and teacher_rows is None and teacher_logits.shape[:-1] == lead_shape:
        return values.view(lead_shape), {name: v.view(lead_shape) for name, v in named.items()}
    return values, named


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    *,
    student_rows: torch.Tensor | None = None,
    teacher_rows: torch.Tensor | None = None,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per-position divergence D(teacher → student), differentiable w.r.t. `student_logits` only.

    Computed in fp32 (float64 inputs stay float64).

    Without row indices both inputs are (..., vocab) of the same shape and the result has their leading shape.
    With `student_rows` / `teacher_rows` (int64, one entry per position, same count on both sides) rows are
    taken from the flattened (-1, vocab) inputs and the result is (positions,).
    """
    return divergence_and_statistics(
        student_logits, teacher_logits, kind, temperature, student_rows=student_rows, teacher_rows=teacher_rows,
        skew_lambda=skew_lambda, akl_alpha=akl_alpha, chunk_elements=chunk_elements,
    )[0]
