"""DSKDv2 against a naive implementation: shared vocabulary, pseudo-inverse init, exact alignment, agreement mask."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import (
    Setup,
    linked_setup,
    naive_ce_sum,
    naive_exact_pairs,
    naive_shared,
    optimise_steps,
    params_with_grad,
    teacher_tokenizer,
    tiny_model,
    trainable_names,
)

from dwakd.methods import build_method, method_names


def right_inverse(a: torch.Tensor) -> torch.Tensor:
    """Moore–Penrose inverse of a full-row-rank (d, K) matrix, d < K: aᵀ(a aᵀ)⁻¹."""
    return a.T @ torch.linalg.inv(a @ a.T)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return (p * (log_p - log_q)).sum()


def naive_dskdv2_terms(setup: Setup, method, s_out, t_out, tau: float, use_agreement: bool = True):
    """Loop over aligned pairs; returns (t2s_ce, t2s_kd, s2t_kd) sums and the per-pair agreement list."""
    vs, vt = len(setup.s_tok), len(setup.t_tok)
    t_ids, s_ids = naive_shared(setup)
    w_s = setup.student.get_output_embeddings().weight[:vs].detach()
    w_t = setup.teacher.get_output_embeddings().weight[:vt].detach()
    s2t = w_s[s_ids].T @ right_inverse(w_t[t_ids].T)  # (d_s, d_t)
    to_student = dict(zip(t_ids, s_ids))
    h_s, h_t = s_out.hidden_states[-1], t_out.hidden_states[-1]
    t2s_ce = t2s_kd = s2t_kd = h_s.new_zeros(())
    agreement = []
    for b, i, j in sorted(naive_exact_pairs(setup.s_view, setup.t_view)):
        pred = int(t_out.logits[b, j, :vt].argmax())
        if pred not in to_student:
            continue
        target = to_student[pred]
        t2s_logits = method.t2s.weight @ h_t[b, j] @ w_s.T  # (V_s,)
        t2s_ce = t2s_ce - torch.log_softmax(t2s_logits, -1)[target]
        agree = int(t2s_logits.argmax()) == target
        agreement.append(agree)
        if agree or not use_agreement:
            t2s_kd = t2s_kd + kl(torch.log_softmax(t2s_logits.detach() / tau, -1),
                                 torch.log_softmax(s_out.logits[b, i, :vs] / tau, -1))
        s2t_logits = (h_s[b, i] @ s2t) @ w_t.T  # (V_t,)
        s2t_kd = s2t_kd + kl(torch.log_softmax(t_out.logits[b, j, :vt] / tau, -1),
                             torch.log_softmax(s2t_logits / tau, -1))
    return t2s_ce, t2s_kd, s2t_kd, agreement


@pytest.fixture(scope="module")
def setup():
    return linked_setup()


def test_registered():
    assert "dskdv2" in method_names()


def test_pseudo_inverse_initialisation(setup, tmp_path):
    method = build_method("dskdv2", setup.context(tmp_path))
    t_ids, s_ids = naive_shared(setup)
    assert method.shared_teacher_ids.tolist() == t_ids and method.shared_student_ids.tolist() == s_ids
    assert len(t_ids) > 50
    w_s = setup.student.get_output_embeddings().weight[: len(setup.s_tok)].detach()[s_ids].T  # (d_s, K)
    w_t = setup.teacher.get_output_embeddings().weight[: len(setup.t_tok)].detach()[t_ids].T  # (d_t, K)
    # least squares: t2s(h)·W_s,shared ≈ h·W_t,shared, i.e. W_s,sharedᵀ·Wᵀ ≈ W_t,sharedᵀ (unique: K > d_s)
    expected = torch.linalg.lstsq(w_s.T, w_t.T).solution  # (d_s, d_t) = Linear weight (out=d_s, in=d_t)
    torch.testing.assert_close(method.t2s.weight.double(), expected, rtol=1e-4, atol=1e-6)
    assert method.t2s.bias is None
    # the projected logits reproduce the teacher's better than an untrained projector does
    h = torch.randn(5, w_t.shape[0], dtype=torch.float64)
    good = (h @ method.t2s.weight.double().T @ w_s - h @ w_t).norm()
    raw = build_method("dskdv2", setup.context(tmp_path), {"init_t2s": False})
    bad = (h @ raw.t2s.weight.double().T @ w_s - h @ w_t).norm()
    assert good < bad


@pytest.mark.parametrize("kd_rate", [0.5, 0.2])
def test_loss_and_gradients_match_naive(setup, tmp_path, kd_rate):
    method = build_method("dskdv2", setup.context(tmp_path), {"kd_rate": kd_rate, "kd_temperature": 1.5}).double()
    inputs = setup.inputs(hidden=True)
    out = method(inputs)
    n = inputs.num_items
    t2s_ce, t2s_kd, s2t_kd, agreement = naive_dskdv2_terms(setup, method, inputs.student_out, inputs.teacher_out, 1.5)
    assert len(agreement) > 5 and out.stats["kept_fraction"] == pytest.approx(len(agreement) / int(n))
    assert float(out.stats["t2s_agreement"]) == pytest.approx(sum(agreement) / len(agreement))
    for name, value in (("t2s_ce", t2s_ce), ("t2s_kd", t2s_kd), ("s2t_kd", s2t_kd)):
        torch.testing.assert_close(out.parts[name], (value / n).detach(), rtol=1e-8, atol=1e-10)
    ce = naive_ce_sum(inputs.student_out.logits, setup.s_view.labels, len(setup.s_tok))
    ref = (1 - kd_rate) * ce / n + kd_rate * (t2s_ce + t2s_kd + s2t_kd) / n
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-9)  # the shared CE helper runs in fp32
    params = [p for p in setup.student.parameters()] + [method.t2s.weight]
    got = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


def test_agreement_mask_matters(setup, tmp_path):
    """With a random (not pinv-initialised) projector few pairs agree, and only those count in t2s_kd."""
    method = build_method("dskdv2", setup.context(tmp_path), {"init_t2s": False}).double()
    inputs = setup.inputs(hidden=True)
    out = method(inputs)
    _, masked, _, agreement = naive_dskdv2_terms(setup, method, inputs.student_out, inputs.teacher_out, 2.0)
    _, unmasked, _, _ = naive_dskdv2_terms(setup, method, inputs.student_out, inputs.teacher_out, 2.0, False)
    assert not all(agreement)
    torch.testing.assert_close(out.parts["t2s_kd"], (masked / inputs.num_items).detach(), rtol=1e-8, atol=1e-10)
    assert float(unmasked.detach()) > float(masked.detach())


def test_gradients_reach_student_and_t2s_only(tmp_path):
    setup = linked_setup()
    method = build_method("dskdv2", setup.context(tmp_path)).double()
    inputs = setup.inputs(hidden=True)
    teacher_logits = inputs.teacher_out.logits.detach().clone().requires_grad_(True)
    teacher_hidden = tuple(h.detach().clone().requires_grad_(True) for h in inputs.teacher_out.hidden_states)
    inputs.teacher_out.logits, inputs.teacher_out.hidden_states = teacher_logits, teacher_hidden
    out = method(inputs)
    out.loss.backward()
    assert params_with_grad(setup.student, method) == trainable_names(setup.student, method) == (
        trainable_names(setup.student) | {"1.t2s.weight"}
    )
    assert teacher_logits.grad is None and all(h.grad is None for h in teacher_hidden)
    assert all(p.grad is None for p in setup.teacher.parameters())
    assert set(method.state_dict()) == {"t2s.weight"}  # buffers are rebuilt from the tokenizers and heads


def test_padding_invariance_and_identity_alignment(tmp_path):
    setup, padded = linked_setup(), linked_setup(extra_pad=4)
    a = build_method("dskdv2", setup.context(tmp_path)).double()(setup.inputs(hidden=True)).loss
    b = build_method("dskdv2", padded.context(tmp_path)).double()(padded.inputs(hidden=True)).loss
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-9)  # fp32 CE sums
    # same tokenizer on both sides: the identity alignment and the whole vocabulary as the shared one
    same = Setup()
    same.s_tok, same.s_view = same.t_tok, same.t_view
    same.student = tiny_model("gpt2", len(same.t_tok), 0, hidden=16)
    method = build_method("dskdv2", same.context(tmp_path)).double()
    assert method.alignment == "identity" and method.shared_teacher_ids.numel() == len(teacher_tokenizer())
    out = method(same.inputs(hidden=True))
    assert out.stats["aligned_fraction"] == pytest.approx(1.0) and out.stats["kept_fraction"] == pytest.approx(1.0)


def test_string_alignment_option_matches_offsets_on_plain_text(setup, tmp_path):
    """On this ASCII batch the reference's two-pointer over token strings finds exactly the offset pairs."""
    strings = build_method("dskdv2", setup.context(tmp_path), {"alignment": "strings"}).double()
    offsets = build_method("dskdv2", setup.context(tmp_path), {"alignment": "offsets"}).double()
    pairs_strings, count = strings.align(setup.s_view, setup.t_view)
    pairs_offsets, _ = offsets.align(setup.s_view, setup.t_view)
    naive = {(b, i, j) for b, i, j in naive_exact_pairs(setup.s_view, setup.t_view)}
    assert torch.equal(pairs_strings, pairs_offsets) and count == len(naive) > 0
    inputs = setup.inputs(hidden=True)
    a, b = strings(inputs), offsets(inputs)
    assert torch.equal(a.loss, b.loss) and 0 < float(a.stats["aligned_fraction"]) < 1


def test_optimisation_reduces_loss(tmp_path):
    setup = linked_setup(seed=6)
    method = build_method("dskdv2", setup.context(tmp_path)).double()
    losses = optimise_steps(setup, method, steps=6, hidden=True)
    assert losses[-1] < losses[0]
