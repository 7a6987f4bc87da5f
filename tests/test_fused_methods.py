"""`head_fusion: fused` (the fused LM head + divergence op) equals `dense` (F.linear logits) in every dual-space method.

Same inputs, same initial projectors: the loss, every logged part and statistic, and the gradients of the student
and of the method's projectors agree (float64 tightly, fp32 at ~1e-5, bf16 autocast loosely); the teacher never
gets a gradient. The model views defer the LM head like the trainer does, which is what lets the fused op read
hidden states and head weights instead of logits; a view with dense logits keeps the dense path.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _baseline_helpers import linked_setup
from _kd_helpers import (
    aim_t2s_at_gold,
    context_for,
    make_batch,
    one_thread,
    record_fused_calls,
    tiny_student,
    tiny_teacher,
)

import dwakd.methods.dskd as dskd_module
import dwakd.methods.dskdv2 as dskdv2_module
from dwakd.methods import build_method
from dwakd.methods.base import DistillationInputs, ModelView, OptionError
from dwakd.ops.fused_kd import DIVERGENCES

CMA_METHODS = ("dskd", "dwakd")
V2_METHODS = ("dskdv2", "dwakdv2")
# float64: the dense path takes the student CE in fp32 (`logits.float()`), the fused op in float64
RTOL = {torch.float64: 1e-6, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def deferred_view(out, model: torch.nn.Module, vocab: int) -> ModelView:
    """A ModelView as the trainer builds it with the head deferred: hidden states and the head, no logits."""
    return ModelView(None, out.hidden_states, model, vocab, head=model.get_output_embeddings(),
                     last_hidden=out.hidden_states[-1])


def forward(student, teacher, s_view, t_view, s_vocab: int, t_vocab: int) -> DistillationInputs:
    out = student(input_ids=s_view.input_ids, attention_mask=s_view.attention_mask, output_hidden_states=True,
                  use_cache=False)
    with torch.no_grad():
        t_out = teacher(input_ids=t_view.input_ids, attention_mask=t_view.attention_mask, output_hidden_states=True,
                        use_cache=False)
    return DistillationInputs(s_view, t_view, deferred_view(out, student, s_vocab),
                              deferred_view(t_out, teacher, t_vocab), torch.as_tensor(s_view.label_mask.sum()))


class Case:
    """A student, a frozen teacher, one batch and a way to build a method on them."""

    def __init__(self, family: str, dtype: torch.dtype, cache_dir):
        self.dtype, self.family = dtype, family
        if family == "cma":
            self.student, self.teacher = tiny_student(dtype=dtype), tiny_teacher(dtype=dtype)
            batch = make_batch()
            self.s_view, self.t_view = batch.student, batch.teacher
            self.context = context_for(self.student, self.teacher)
            self.s_vocab, self.t_vocab = 37, 53
        else:
            setup = linked_setup()
            self.student, self.teacher = setup.student.to(dtype), setup.teacher.to(dtype)
            self.s_view, self.t_view = setup.s_view, setup.t_view
            self.context = setup.context(cache_dir)
            self.s_vocab, self.t_vocab = len(setup.s_tok), len(setup.t_tok)

    def method(self, name: str, **options):
        torch.manual_seed(3)
        method = build_method(name, self.context, options).to(self.dtype)
        if self.family == "cma":  # DSKD's correctness mask keeps some positions and drops others
            aim_t2s_at_gold(method, self.student, SimpleNamespace(student=self.s_view))
        return method

    def inputs(self) -> DistillationInputs:
        return forward(self.student, self.teacher, self.s_view, self.t_view, self.s_vocab, self.t_vocab)


_CASES: dict = {}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fused_methods")


def case(method: str, dtype: torch.dtype, cache_dir) -> Case:
    """One Case per (host family, dtype), built once per module run."""
    key = ("cma" if method in CMA_METHODS or method.startswith("dwakd-") else "v2", dtype)
    if key not in _CASES:
        _CASES[key] = Case(*key, cache_dir)
    return _CASES[key]


def densify(view: ModelView) -> None:
    """Turn a deferred-head view into one with dense logits (as the teacher cache or a logit transform gives)."""
    view.logits = view._head(view.last_hidden)
    view._head = None


def run(c: Case, method, autocast: bool = False, dense_side: str | None = None) -> tuple:
    """Loss, parts, stats and gradients (student's and method's parameters) of one forward + backward."""
    params = {f"student.{n}": p for n, p in c.student.named_parameters() if p.requires_grad}
    params.update({f"method.{n}": p for n, p in method.named_parameters() if p.requires_grad})
    for p in list(params.values()) + list(c.teacher.parameters()):
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        inputs = c.inputs()
        if dense_side is not None:
            densify(getattr(inputs, f"{dense_side}_out"))
        out = method(inputs)
    out.loss.backward()
    assert all(p.grad is None for p in c.teacher.parameters()), "the teacher got a gradient"
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    return float(out.loss.detach()), {k: float(v) for k, v in out.parts.items()}, \
        {k: float(v) for k, v in out.stats.items()}, grads


def both(name: str, dtype: torch.dtype, cache_dir, autocast: bool = False, tweak=None, dense_side=None,
         **options) -> tuple:
    c = case(name, dtype, cache_dir)
    dense = c.method(name, head_fusion="dense", **options)
    fused = c.method(name, head_fusion="fused", **options)
    fused.load_state_dict(dense.state_dict())
    if tweak is not None:
        tweak(dense), tweak(fused)
    result = run(c, fused, autocast, dense_side), run(c, dense, autocast)
    mask_stat = result[1][2]["t2s_acc" if c.family == "cma" else "t2s_agreement"]
    assert 0.0 < mask_stat < 1.0  # the t2s mask (and the gate) really select
    return result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: the error on the scale of the tensor."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def assert_same(fused: tuple, dense: tuple, rtol: float, atol: float = 0.0, grad_rtol: float | None = None) -> None:
    """Loss at `rtol`; each part and statistic at `rtol` of itself or of the loss (a small KL term's rounding is on
    the scale of the logits, not of its own value); each gradient at `grad_rtol` of its largest entry, or below
    fp32/bf16 rounding of the largest gradient (measured against 1% of it: a nearly-zero gradient that comes out
    of cancellations, e.g. the query projector's (~1e-6 of the largest) once `aim_t2s_at_gold` shrinks t2s, is
    rounding noise in fp32 on either path; the float64 tests hold every gradient to its own scale)."""
    (loss_f, parts_f, stats_f, grads_f), (loss_d, parts_d, stats_d, grads_d) = fused, dense
    assert loss_f == pytest.approx(loss_d, rel=rtol, abs=atol)
    atol = max(atol, rtol * abs(loss_d))
    assert parts_f.keys() == parts_d.keys() and stats_f.keys() == stats_d.keys()
    for name in parts_d:
        assert parts_f[name] == pytest.approx(parts_d[name], rel=rtol, abs=atol), name
    for name in stats_d:
        assert stats_f[name] == pytest.approx(stats_d[name], rel=rtol, abs=atol), name
    assert grads_f.keys() == grads_d.keys()
    assert any(n.startswith("method.") for n in grads_d) and any(n.startswith("student.") for n in grads_d)
    largest = max(float(g.abs().max()) for g in grads_d.values())
    floor = 1e-2 * largest if next(iter(grads_d.values())).dtype != torch.float64 else 0.0
    for name, b in grads_d.items():
        error = float((grads_f[name].double() - b.double()).abs().max())
        assert error <= (grad_rtol or rtol) * max(float(b.abs().max()), floor), (name, relative(grads_f[name], b))


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Counts the calls of the fused op from the hosts (proves the fused path ran)."""
    return record_fused_calls(monkeypatch, dskd_module, dskdv2_module)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("name", CMA_METHODS + V2_METHODS)
def test_fused_equals_dense_float64(name: str, kind: str, fused_calls: list, cache_dir) -> None:
    fused, dense = both(name, torch.float64, cache_dir, kd_objective=kind)
    assert len(fused_calls) >= 2  # student space and teacher space went through the op
    assert_same(fused, dense, RTOL[torch.float64])


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("name", CMA_METHODS + V2_METHODS)
def test_fused_equals_dense_fp32(name: str, kind: str, cache_dir) -> None:
    fused, dense = both(name, torch.float32, cache_dir, kd_objective=kind, kd_temperature=1.5)
    assert_same(fused, dense, RTOL[torch.float32])


@pytest.mark.parametrize("name", ["dwakd-ew", "dwakd-dtw", "dwakd-bdtw", "dwakd-nogate", "dwakd-ref"])
def test_fused_equals_dense_presets(name: str, cache_dir) -> None:
    fused, dense = both(name, torch.float64, cache_dir)
    assert_same(fused, dense, RTOL[torch.float64])


@pytest.mark.parametrize("name", ["dwakd", "dwakdv2"])
def test_fused_equals_dense_gate_after_rescale_and_temperature(name: str, cache_dir) -> None:
    fused, dense = both(name, torch.float64, cache_dir, kd_objective="srkl", kd_temperature=2.0,
                        gate_after_rescale=True, dtw="off", kd_rate=0.3)
    assert_same(fused, dense, RTOL[torch.float64])


@pytest.mark.parametrize("kind", ["fkl", "akl"])
@pytest.mark.parametrize("name", V2_METHODS)
def test_fused_equals_dense_when_aligned_pairs_are_dropped(name: str, kind: str, cache_dir) -> None:
    """Pairs whose teacher argmax has no student counterpart are dropped after the fused teacher-space call."""

    def unmap_half(method) -> None:  # every other teacher token loses its exact-text student counterpart
        method.teacher_to_student[1::2] = -1

    fused, dense = both(name, torch.float64, cache_dir, tweak=unmap_half, kd_objective=kind)
    assert 0.0 < dense[2]["kept_fraction"] < dense[2]["aligned_fraction"]
    assert_same(fused, dense, RTOL[torch.float64])


@pytest.mark.parametrize("name", ["dskd", "dwakd", "dwakdv2"])
def test_fused_equals_dense_bf16_autocast(name: str, cache_dir) -> None:
    """bf16 logits on both paths: the existing bf16 tests' tolerance (argmax ties may flip a mask entry)."""
    fused, dense = both(name, torch.float32, cache_dir, autocast=True)
    assert_same(fused, dense, 5e-2, atol=1e-3, grad_rtol=5e-2)


@pytest.mark.parametrize("dense_side", ["student", "teacher"])
@pytest.mark.parametrize("name", ["dwakd", "dwakdv2"])
def test_one_side_with_dense_logits(name: str, dense_side: str, fused_calls: list, cache_dir) -> None:
    """A side without a deferred head keeps the dense path for its space; the other space is still fused."""
    fused, dense = both(name, torch.float64, cache_dir, dense_side=dense_side, kd_objective="js")
    assert fused_calls  # the other side went through the op
    assert_same(fused, dense, RTOL[torch.float64])


def test_dense_logits_keep_the_dense_path(fused_calls: list, cache_dir) -> None:
    """A view built from dense logits (no deferred head) is used as given, whatever head_fusion says."""
    c = case("dskd", torch.float64, cache_dir)
    method = c.method("dwakd")
    inputs = c.inputs()
    for view in (inputs.student_out, inputs.teacher_out):
        densify(view)
    method(inputs).loss.backward()
    assert fused_calls == []


def test_partitioned_or_wrapped_heads_keep_the_dense_path(fused_calls: list, cache_dir, monkeypatch) -> None:
    """A head DeepSpeed ZeRO-3 partitions (its weight has `ds_id`) or that has a bias is applied as a module."""
    c = case("dskd", torch.float64, cache_dir)
    method = c.method("dwakd")
    monkeypatch.setattr(c.student.get_output_embeddings().weight, "ds_id", 7, raising=False)
    inputs = c.inputs()
    assert inputs.student_out.linear_head_weight() is None
    teacher_head = c.teacher.get_output_embeddings()
    monkeypatch.setattr(teacher_head, "bias", torch.nn.Parameter(torch.zeros(teacher_head.out_features,
                                                                             dtype=c.dtype), requires_grad=False))
    assert inputs.teacher_out.linear_head_weight() is None
    method(inputs).loss.backward()
    assert fused_calls == []


@pytest.mark.parametrize("autocast", [False, True])
def test_auto_on_cpu_is_dense_in_fp32_and_fused_under_bf16_autocast(autocast: bool, fused_calls: list,
                                                                     cache_dir) -> None:
    """`head_fusion: auto` decides at the forward: in fp32 on a CPU the dense path (its numba forward-KL kernels),
    under bf16 autocast (`bf16: true`) the fused op, whose dense alternative then runs on bf16 logits."""
    c = case("dskd", torch.float32, cache_dir)
    run(c, c.method("dwakd", head_fusion="auto"), autocast=autocast)
    assert len(fused_calls) == (2 if autocast else 0)  # student space and teacher space, or neither
    fused_calls.clear()
    run(c, c.method("dwakd", head_fusion="dense"), autocast=autocast)  # an explicit choice is kept
    assert fused_calls == []


def test_head_fusion_is_validated(cache_dir) -> None:
    c = case("dskd", torch.float64, cache_dir)
    with pytest.raises(OptionError, match="head_fusion"):
        c.method("dskd", head_fusion="chunked")
