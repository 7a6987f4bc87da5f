"""The KL family of SPEC §3, per position, chunked over tokens so no (tokens, vocab) temporaries pile up.

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
No τ² factor (SPEC §2). Gradients flow to the student argument only; the teacher argument is a fixed target.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DIVERGENCES = ("fkl", "rkl", "sfkl", "srkl", "js", "akl")
ALIASES = {
    "forward_kl": "fkl",
    "reverse_kl": "rkl",
    "skewed_forward_kl": "sfkl",
    "skewed_reverse_kl": "srkl",
    "js_divergence": "js",
    "adaptive_kl": "akl",
}
CHUNK_ELEMENTS = 1 << 24  # fp32 elements per (rows, vocab) temporary: 64 MiB


def resolve_divergence(name: str) -> str:
    """Canonical short name for `name` (accepts DSKD's long names); raises with the valid choices otherwise."""
    key = ALIASES.get(name, name)
    if key not in DIVERGENCES:
        choices = f"{', '.join(DIVERGENCES)} (or {', '.join(ALIASES)})"
        raise ValueError(f"unknown divergence {name!r}; choose one of {choices}")
    return key


def chunk_rows(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so one (rows, vocab) fp32 temporary holds about `chunk_elements` values."""
    return max(1, chunk_elements // max(1, vocab))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype otherwise (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., vocab) -> (rows, vocab) view (a copy only if `x` is not viewable)."""
    return x.reshape(-1, x.shape[-1])


def iter_row_chunks(
    x: torch.Tensor, rows: torch.Tensor | None, chunk: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, end, chunk in at least fp32) over the selected rows of a 2-D tensor (all when `rows` is None)."""
    dtype = compute_dtype(x)
    total = x.shape[0] if rows is None else rows.numel()
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        part = x[start:end] if rows is None else x.index_select(0, rows[start:end])
        yield start, end, part.to(dtype)


@dataclass(frozen=True)
class _Spec:
    """Which divergence and its constants, passed through the autograd function."""

    kind: str
    temperature: float
    skew_lambda: float
    akl_alpha: float
    chunk: int


def _plogdiff(w: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Σ_v w·diff with the convention 0·(anything) = 0, per row."""
    return torch.where(w > 0, w * diff, torch.zeros_like(w)).sum(-1)


def _softmax_vjp(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """∂/∂s of a function of q = softmax(s) whose gradient w.r.t. q is `a`: q ⊙ (a − ⟨q, a⟩), 0 where q = 0."""
    qa = torch.where(q > 0, q * a, torch.zeros_like(q))
    return qa - q * qa.sum(-1, keepdim=True)


def _akl_mix(p: torch.Tensor, q: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and tail mixing weights (rows,) of adaptive KL; ½/½ where p and q coincide (no gap at all)."""
    sorted_p, order = p.sort(-1)  # ascending teacher probabilities
    gap = (sorted_p - q.gather(-1, order)).abs()
    tail = sorted_p.cumsum(-1).le(alpha)
    g_tail = (gap * tail).sum(-1)
    g_head = (gap * ~tail).sum(-1)
    total = g_head + g_tail
    safe = total.clamp_min(torch.finfo(total.dtype).tiny)
    half = torch.full_like(total, 0.5)
    return torch.where(total > 0, g_head / safe, half), torch.where(total > 0, g_tail / safe, half)


def _value_and_grad(
    s: torch.Tensor, t: torch.Tensor, spec: _Spec, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence (rows,) and its gradient w.r.t. the *scaled* student logits s (or None)."""
    log_q = torch.log_softmax(s, -1)
    log_p = torch.log_softmax(t, -1)
    q, p = log_q.exp(), log_p.exp()
    kind, lam = spec.kind, spec.skew_lambda
    grad = None
    if kind == "fkl":
        value = _plogdiff(p, log_p - log_q)
        if want_grad:
            grad = q - p
    elif kind == "rkl":
        value = _plogdiff(q, log_q - log_p)
        if want_grad:
            grad = _softmax_vjp(q, log_q - log_p)  # the "+1" of ∂(q log q)/∂q cancels in the softmax Jacobian
    elif kind == "sfkl":
        log_m = torch.logaddexp(math.log(lam) + log_p, math.log1p(-lam) + log_q) if lam > 0 else log_q
        value = _plogdiff(p, log_p - log_m)
        if want_grad:
            grad = _softmax_vjp(q, -(1.0 - lam) * torch.exp(log_p - log_m))
    elif kind == "srkl":
        log_m = torch.logaddexp(math.log1p(-lam) + log_p, math.log(lam) + log_q) if lam > 0 else log_p
        value = _plogdiff(q, log_q - log_m)
        if want_grad:
            grad = _softmax_vjp(q, log_q - log_m - lam * torch.exp(log_q - log_m))
    elif kind == "js":
        log_mid = torch.logaddexp(log_p, log_q) - math.log(2.0)
        value = 0.5 * _plogdiff(p, log_p - log_mid) + 0.5 * _plogdiff(q, log_q - log_mid)
        if want_grad:
            grad = _softmax_vjp(q, 0.5 * (log_q - log_mid))  # the p/M and q/M terms cancel: (p + q)/(2M) = 1
    elif kind == "akl":
        w_head, w_tail = _akl_mix(p, q, spec.akl_alpha)
        fkl = _plogdiff(p, log_p - log_q)
        rkl = _plogdiff(q, log_q - log_p)
        value = w_head * fkl + w_tail * rkl
        if want_grad:
            grad = w_head.unsqueeze(-1) * (q - p) + w_tail.unsqueeze(-1) * _softmax_vjp(q, log_q - log_p)
    else:  # pragma: no cover - resolve_divergence guards this
        raise ValueError(kind)
    return value, grad


class _KLFamily(torch.autograd.Function):
    """Chunked per-row divergence; backward recomputes each chunk instead of saving intermediates."""

    @staticmethod
    def forward(ctx, student, teacher, student_rows, teacher_rows, spec):  # type: ignore[override]
        total = student.shape[0] if student_rows is None else student_rows.numel()
        out = torch.empty(total, dtype=compute_dtype(student), device=student.device)  # (positions,)
        tau = spec.temperature
        t_chunks = iter_row_chunks(teacher, teacher_rows, spec.chunk)
        s_chunks = iter_row_chunks(student, student_rows, spec.chunk)
        for (start, end, s), (_, _, t) in zip(s_chunks, t_chunks, strict=True):
            out[start:end] = _value_and_grad(s / tau, t / tau, spec, want_grad=False)[0]
        ctx.save_for_backward(student, teacher, student_rows, teacher_rows)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        student, teacher, student_rows, teacher_rows = ctx.saved_tensors
        spec: _Spec = ctx.spec
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        # (rows, vocab) gradient of the student input; rows not selected get zero
        grad = torch.zeros_like(student) if student_rows is not None else torch.empty_like(student)
        tau = spec.temperature
        t_chunks = iter_row_chunks(teacher, teacher_rows, spec.chunk)
        s_chunks = iter_row_chunks(student, student_rows, spec.chunk)
        for (start, end, s), (_, _, t) in zip(s_chunks, t_chunks, strict=True):
            g = _value_and_grad(s / tau, t / tau, spec, want_grad=True)[1]
            g = g * (grad_out[start:end].to(g.dtype).unsqueeze(-1) / tau)
            if student_rows is None:
                grad[start:end] = g.to(grad.dtype)
            else:
                grad.index_copy_(0, student_rows[start:end], g.to(grad.dtype))
        return grad, None, None, None, None


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
    values = _KLFamily.apply(student, teacher, student_rows, teacher_rows, spec)
    if student_rows is None and teacher_rows is None and teacher_logits.shape[:-1] == lead_shape:
        return values.view(lead_shape)
    return values
