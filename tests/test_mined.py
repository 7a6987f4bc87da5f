"""MinED against a naive implementation: per-sequence DTW, vocabulary map, mapped teacher targets, one-hot fallback."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import (
    Setup,
    leaf_logits,
    naive_ce_sum,
    naive_dtw,
    naive_levenshtein,
    naive_student_to_teacher,
    naive_vocab_map,
    optimise_steps,
    params_with_grad,
    trainable_names,
)
from _kd_helpers import record_fused_calls

from dwakd.alignment.token_strings import token_table
from dwakd.methods import build_method, method_names
from dwakd.methods.base import DistillationInputs, ModelView, OptionError


def naive_mined_kd_sum(setup: Setup, s_logits, t_logits, tau: float, kind: str) -> tuple[torch.Tensor, int]:
    """Σ over student response positions of D(mapped teacher → student) where aligned, else −log q_τ(gold)."""
    s_table, t_table = token_table(setup.s_tok), token_table(setup.t_tok)
    mapping, dist = naive_vocab_map(list(t_table.data), list(s_table.data), setup.t_tok.eos_token_id,
                                    setup.s_tok.eos_token_id)
    vs = len(setup.s_tok)
    rep = naive_student_to_teacher(mapping, dist, vs)
    s_labels, t_labels = setup.s_view.labels, setup.t_view.labels
    total, aligned = s_logits.new_zeros(()), 0
    for b in range(s_labels.shape[0]):
        s_pos = [i for i in range(s_labels.shape[1]) if s_labels[b, i] != -100]
        t_pos = [j for j in range(t_labels.shape[1]) if t_labels[b, j] != -100]
        s_str = [s_table.data[int(s_labels[b, i])].replace(b" ", b"") for i in s_pos]
        t_str = [t_table.data[int(t_labels[b, j])].replace(b" ", b"") for j in t_pos]
        path = naive_dtw([[naive_levenshtein(a, c) for c in s_str] for a in t_str])  # rows: teacher
        for k, i in enumerate(s_pos):
            log_q = torch.log_softmax(s_logits[b, i, :vs] / tau, -1)
            partners = [tj for tj, sk in path if sk == k]
            gold = int(s_labels[b, i])
            if len(partners) == 1 and mapping[int(t_labels[b, t_pos[partners[0]]])] == gold:
                j = t_pos[partners[0]]
                target = torch.stack([t_logits[b, j, r].detach() if r >= 0 else torch.tensor(-1e5, dtype=torch.float64)
                                      for r in rep])
                log_p = torch.log_softmax(target / tau, -1)
                p, q = log_p.exp(), log_q.exp()
                if kind == "fkl":
                    total = total + torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()
                else:  # reverse KL
                    total = total + (q * (log_q - log_p)).sum()
                aligned += 1
            else:
                total = total - log_q[gold]
    return total, aligned


@pytest.fixture(scope="module")
def setup():
    return Setup(student_arch="llama")


def test_registered():
    assert "mined" in method_names()


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_loss_and_gradients_match_naive(setup, tmp_path, kind):
    method = build_method("mined", setup.context(tmp_path), {"kd_objective": kind, "kd_temperature": 1.5})
    assert len(list((tmp_path / "vocab_maps").glob("*.npz"))) == 1  # the map was cached under cache_dir
    inputs = setup.inputs()
    s_logits, t_logits = leaf_logits(inputs)
    out = method(inputs)
    n = inputs.num_items
    s_ref = s_logits.detach().clone().requires_grad_(True)
    kd_sum, aligned = naive_mined_kd_sum(setup, s_ref, t_logits, 1.5, kind)
    assert 0 < aligned < int(n)  # both the distilled and the one-hot branch are exercised
    assert out.stats["aligned_fraction"] == pytest.approx(aligned / int(n))
    kd = kd_sum / n
    ref = 0.5 * naive_ce_sum(s_ref, setup.s_view.labels, len(setup.s_tok)) / n + 0.5 * kd
    torch.testing.assert_close(out.parts["kd"], kd.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-9)  # the shared CE helper runs in fp32
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s_logits.grad, s_ref.grad, rtol=1e-5, atol=1e-8)
    assert t_logits.grad is None
    assert s_logits.grad[..., len(setup.s_tok):].abs().sum() == 0
    assert s_logits.grad[~setup.s_view.label_mask].abs().sum() == 0


def test_gradients_reach_student_only_and_padding_invariant(tmp_path):
    setup, padded = Setup(), Setup(extra_pad=3)
    method = build_method("mined", setup.context(tmp_path))
    out = method(setup.inputs())
    out.loss.backward()
    assert params_with_grad(setup.student) == trainable_names(setup.student)
    assert all(p.grad is None for p in setup.teacher.parameters()) and list(method.parameters()) == []
    again = build_method("mined", padded.context(tmp_path))(padded.inputs())
    torch.testing.assert_close(again.loss.detach(), out.loss.detach(), rtol=1e-6, atol=1e-9)  # fp32 CE sums


def test_optimisation_reduces_loss(tmp_path):
    setup = Setup(seed=4)
    method = build_method("mined", setup.context(tmp_path))
    losses = optimise_steps(setup, method, steps=6)
    assert losses[-1] < losses[0]


def deferred_inputs(setup: Setup) -> DistillationInputs:
    """Both views as the trainer builds them with the LM heads deferred: hidden states and heads, no logits."""
    views = []
    for model, view, tok in ((setup.student, setup.s_view, setup.s_tok), (setup.teacher, setup.t_view, setup.t_tok)):
        with torch.set_grad_enabled(model is setup.student):
            out = model(input_ids=view.input_ids, attention_mask=view.attention_mask, output_hidden_states=True)
        views.append(ModelView(None, out.hidden_states, model, len(tok), head=model.get_output_embeddings(),
                               last_hidden=out.hidden_states[-1]))
    return DistillationInputs(setup.s_view, setup.t_view, *views, setup.s_view.label_mask.sum())


def loss_parts_grads(setup: Setup, method, inputs: DistillationInputs) -> tuple:
    for p in setup.student.parameters():
        p.grad = None
    out = method(inputs)
    out.loss.backward()
    assert all(p.grad is None for p in setup.teacher.parameters())
    grads = {n: p.grad.detach().clone() for n, p in setup.student.named_parameters() if p.grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in out.parts.items()}, dict(out.stats), grads


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Records the divergence of every `fused_head_kd` call MinED makes (proves the fused path ran)."""
    import dwakd.methods.mined as mined_module

    return record_fused_calls(monkeypatch, mined_module)


@pytest.mark.parametrize("tau", [1.0, 1.5])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "js"])
def test_fused_heads_equal_dense(setup, tmp_path, fused_calls, kind, tau):
    """`head_fusion: fused` (no (rows × V) logits; the mapped teacher head) == `dense`: loss, parts, gradients."""
    options = {"kd_objective": kind, "kd_temperature": tau}
    dense = build_method("mined", setup.context(tmp_path), {**options, "head_fusion": "dense"})
    fused = build_method("mined", setup.context(tmp_path), {**options, "head_fusion": "fused"})
    want = loss_parts_grads(setup, dense, deferred_inputs(setup))
    assert fused_calls == []
    got = loss_parts_grads(setup, fused, deferred_inputs(setup))
    # CE over the label rows, the KD term, and (τ ≠ 1) the one-hot rows' CE at τ
    assert fused_calls == [None, kind] + ([None] if tau != 1.0 else [])
    assert 0.0 < want[2]["aligned_fraction"] < 1.0 and got[2] == want[2]
    # the dense path's shared CE helper runs in fp32, the fused op in float64: agreement at fp32 rounding
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=1e-6, atol=0)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name].to(got[1][name].dtype), rtol=1e-6, atol=1e-9)
    assert got[3].keys() == want[3].keys()
    for name, grad in want[3].items():
        scale = float(grad.abs().max())
        assert float((got[3][name] - grad).abs().max()) <= 1e-5 * scale, name


def test_fused_heads_accept_dskd_long_divergence_names(setup, tmp_path, fused_calls):
    """`kd_objective: reverse_kl` (DSKD's name) is resolved once, for the dense and the fused path alike."""
    losses = {}
    for name in ("rkl", "reverse_kl"):
        method = build_method("mined", setup.context(tmp_path), {"kd_objective": name, "head_fusion": "fused"})
        losses[name] = method(deferred_inputs(setup)).loss.detach()
    assert fused_calls == [None, "rkl", None] * 2
    torch.testing.assert_close(losses["reverse_kl"], losses["rkl"], rtol=0, atol=0)


def test_mapped_teacher_head_reproduces_mapped_logits(setup, tmp_path):
    """h · (mapped head)ᵀ + bias == `mapped_teacher_logits(h · W_tᵀ)`, column for column."""
    method = build_method("mined", setup.context(tmp_path))
    teacher_w = setup.teacher.get_output_embeddings().weight
    hidden = torch.randn(5, teacher_w.shape[1], dtype=teacher_w.dtype, generator=torch.Generator().manual_seed(0))
    vocab = len(setup.s_tok)
    head, bias = method.mapped_teacher_head(teacher_w, vocab)
    assert head.shape == (vocab, teacher_w.shape[1]) and not head.requires_grad
    torch.testing.assert_close(hidden @ head.t() + bias, method.mapped_teacher_logits(hidden @ teacher_w.t(), None,
                                                                                      vocab), rtol=0, atol=1e-9)


def test_dense_logit_views_keep_the_dense_path(setup, tmp_path, fused_calls):
    """Views with dense logits (a teacher cache, a logit transform) have no linear head to fuse: dense is used."""
    method = build_method("mined", setup.context(tmp_path), {"head_fusion": "fused"})
    method(setup.inputs()).loss.backward()
    assert fused_calls == []


def test_head_fusion_is_validated(setup, tmp_path):
    with pytest.raises(OptionError, match="head_fusion"):
        build_method("mined", setup.context(tmp_path), {"head_fusion": "chunked"})
