"""DSKD-CMA (docs/methods.md §4): loss, parts, gradients vs a naive float64 reference; padding, bf16, LoRA, training."""

from __future__ import annotations

import pytest
import torch
from _kd_helpers import (
    RefOptions,
    aim_t2s_at_gold,
    context_for,
    grads_of,
    make_batch,
    naive_method_loss,
    one_thread,
    run_models,
    tiny_student,
    tiny_teacher,
    trainable,
)

from dwakd.methods import MethodContext, build_method, method_names
from dwakd.modules.divergences import DIVERGENCES


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one torch thread (restored afterwards)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return tiny_student(), tiny_teacher()


def build(name: str, models, seed: int = 3, **options):
    student, teacher = models
    torch.manual_seed(seed)
    return build_method(name, context_for(student, teacher), options).double()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_loss_parts_and_gradients_match_reference(models, kind: str) -> None:
    student, teacher = models
    method = build("dskd", models, kd_objective=kind)
    batch = make_batch()
    aim_t2s_at_gold(method, student, batch)
    out = method(run_models(student, teacher, batch))
    ref = naive_method_loss(method, run_models(student, teacher, batch), RefOptions(kind=kind))
    assert 0 < out.stats["t2s_acc"].item() < 1  # the correctness mask keeps some positions and drops others
    assert out.parts["t2s_kd"].item() > 0
    for name in ("t2s_ce", "t2s_kd", "s2t_kd"):
        assert out.parts[name].item() == pytest.approx(ref[name].item(), rel=1e-10, abs=1e-13), name
    # CE is computed in fp32 by the method, hence the looser tolerance on it and the total
    assert out.parts["ce"].item() == pytest.approx(ref["ce"].item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    params = trainable(method, student)
    got, want = grads_of(out.loss, params), grads_of(ref["loss"], params)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert got["method.projectors.query.weight"].abs().sum() > 0 and got["method.projectors.s2t.weight"].abs().sum() > 0


def test_dynamic_padding_gives_the_same_loss(models) -> None:
    student, teacher = models
    method = build("dskd", models)
    tight = method(run_models(student, teacher, make_batch()))
    padded = method(run_models(student, teacher, make_batch(extra_pad_student=4, extra_pad_teacher=7)))
    for name, value in tight.parts.items():  # CE runs in fp32 (shared SFT helper): rounding-level differences
        assert padded.parts[name].item() == pytest.approx(value.item(), rel=1e-6 if name == "ce" else 1e-10), name


def test_loss_is_sum_over_tokens_divided_by_num_items(models) -> None:
    """The trainer passes the global token count: doubling it halves every part (a token mean, not a sequence mean)."""
    student, teacher = models
    method = build("dskd", models)
    batch = make_batch()
    local = method(run_models(student, teacher, batch))
    n = int(batch.student.label_mask.sum())
    doubled = method(run_models(student, teacher, batch, num_items=2 * n))
    for name, value in local.parts.items():
        assert doubled.parts[name].item() == pytest.approx(value.item() / 2, rel=1e-9), name


def test_bf16_autocast_and_lora_student() -> None:
    from dwakd.models import LoraSpec, apply_lora

    teacher = tiny_teacher(dtype=torch.float32)
    student = apply_lora(tiny_student(dtype=torch.float32), LoraSpec(r=4, alpha=8, target_modules=["c_attn"]))
    method = build_method("dskd", context_for(student, teacher))
    batch = make_batch()
    fp32 = method(run_models(student, teacher, batch)).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(run_models(student, teacher, batch))
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(fp32.item(), rel=5e-2)
    out.loss.backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def test_a_few_steps_reduce_the_loss(models) -> None:
    teacher = models[1]
    student = tiny_student(seed=7)
    method = build("dskd", (student, teacher))
    batch = make_batch()
    params = [p for _, p in trainable(method, student)]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(6):
        loss = method(run_models(student, teacher, batch)).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses


def test_registry_and_errors(models) -> None:
    names = set(method_names())
    assert {"dskd", "dwakd", "dwakd-ew", "dwakd-dtw", "dwakd-bdtw", "dwakd-nogate"} <= names
    student, _ = models
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method("dskd", MethodContext(student.config, None, None, None))
    with pytest.raises(ValueError, match="unknown divergence"):
        build_method("dskd", context_for(*models), {"kd_objective": "kl"})


@pytest.mark.parametrize("name", ["dskd", "dwakd", "dwakd-dtw"])
def test_kd_warmup_ramps_the_student_space_kd_term_only(models, name: str) -> None:
    """`kd_warmup_steps: W` scales t2s_kd by min(1, (step + 1) / W) — DSKD's mask path and DWA-KD's token-weight
    path alike (the option is the host's) — and leaves every other part unchanged."""
    from dwakd.options import OptionError

    student, teacher = models
    batch = make_batch()
    plain_method, warm = build(name, models), build(name, models, kd_warmup_steps=4)
    for method in (plain_method, warm):
        aim_t2s_at_gold(method, student, batch)  # some positions pass DSKD's correctness mask
    plain = plain_method(run_models(student, teacher, batch)).parts
    assert plain["t2s_kd"].item() > 0
    for step, factor in ((0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0)):
        inputs = run_models(student, teacher, batch)
        inputs.step = step
        parts = warm(inputs).parts
        assert parts["t2s_kd"].item() == pytest.approx(factor * plain["t2s_kd"].item(), rel=1e-10), step
        for other in ("ce", "t2s_ce", "s2t_kd"):
            assert parts[other].item() == pytest.approx(plain[other].item(), rel=1e-10), (step, other)
    for bad in (-1, 2.5, True):
        with pytest.raises(OptionError, match="kd_warmup_steps"):
            build(name, models, kd_warmup_steps=bad)
