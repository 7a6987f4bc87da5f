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

from dwakd.alignment.token_strings import token_table
from dwakd.methods import build_method, method_names


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
