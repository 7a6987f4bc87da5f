"""MultiLevelOT against a naive loop implementation: std normalisation, global top-k columns, L1, CE_log, Sinkhorn."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import Setup, leaf_logits, naive_ce_sum, optimise_steps, params_with_grad, trainable_names

from dwakd.methods import build_method, method_names


def _side(logits, labels, vocab, k, temperature):
    """Per sequence, the top-k column rows (in the side's global column order) of each response position."""
    rows = [(b, i) for b in range(labels.shape[0]) for i in range(labels.shape[1]) if labels[b, i] != -100]
    probs = []
    for b, i in rows:
        z = logits[b, i, :vocab]
        z = z / (z.std() + 1e-4)
        probs.append(torch.softmax(z / temperature, -1))
    sums = [sum(float(p[c].detach()) for p in probs) for c in range(vocab)]
    order = sorted(range(vocab), key=lambda c: -sums[c])[:k]
    per_seq = {b: [] for b in range(labels.shape[0])}
    for (b, _), p in zip(rows, probs):
        top = torch.stack([p[c] for c in order])
        per_seq[b].append(torch.cat([top, top.new_zeros(k - len(order))]))
    return per_seq


def naive_sinkhorn(xs, ys, eps, iterations):
    w = torch.stack([torch.stack([(x - y).abs().sum() for y in ys]) for x in xs])  # (teacher, student)
    plan = torch.exp(-w / eps)
    for _ in range(iterations):
        plan = torch.stack([row / row.sum() for row in plan])
        plan = torch.stack([col / col.sum() for col in plan.T]).T
    return (plan * w).sum()


def naive_multilevel_ot(setup, s_logits, t_logits, reference_order=False, k=50):
    vs, vt = len(setup.s_tok), len(setup.t_tok)
    s_seq = _side(s_logits, setup.s_view.labels, vs, k, 1.0)
    t_seq = _side(t_logits.detach(), setup.t_view.labels, vt, k, 1.0)
    l1 = log_loss = sink = s_logits.new_zeros(())
    for b in s_seq:
        for ps, pt in zip(s_seq[b], t_seq[b]):
            l1 = l1 + (ps - pt).abs().sum()
            target, scored = (ps, pt) if reference_order else (pt, ps)
            log_loss = log_loss - (torch.softmax(target, -1) * torch.log_softmax(scored, -1)).sum()
        xs = [torch.softmax(p / 2.0, -1) for p in t_seq[b]]
        ys = [torch.softmax(p / 2.0, -1) for p in s_seq[b]]
        sink = sink + naive_sinkhorn(xs, ys, 0.1, 10)
    return l1, log_loss, sink


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_registered():
    assert "multilevel_ot" in method_names()


@pytest.mark.parametrize("reference_order", [False, True])
def test_loss_and_gradients_match_naive(setup, tmp_path, reference_order):
    method = build_method("multilevel_ot", setup.context(tmp_path), {"log_loss_reference_order": reference_order})
    inputs = setup.inputs()
    s_logits, t_logits = leaf_logits(inputs)
    out = method(inputs)
    n = inputs.num_items
    s_ref = s_logits.detach().clone().requires_grad_(True)
    l1, log_loss, sink = naive_multilevel_ot(setup, s_ref, t_logits, reference_order)
    torch.testing.assert_close(out.parts["token_l1"], (l1 / n).detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.parts["log_loss"], (log_loss / n).detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.parts["sinkhorn"], (sink / n).detach(), rtol=1e-9, atol=1e-12)
    distill = (l1 + 0.1 * log_loss + 1e-4 * sink) / n
    ref = naive_ce_sum(s_ref, setup.s_view.labels, len(setup.s_tok)) / n + 1.5 * distill
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-9)  # the shared CE helper runs in fp32
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s_logits.grad, s_ref.grad, rtol=1e-5, atol=1e-8)
    assert t_logits.grad is None
    assert s_logits.grad[..., len(setup.s_tok):].abs().sum() == 0
    assert s_logits.grad[~setup.s_view.label_mask].abs().sum() == 0


def test_small_vocab_is_zero_padded(setup, tmp_path):
    """top_k above the vocabulary size: the missing columns are zeros on that side."""
    method = build_method("multilevel_ot", setup.context(tmp_path), {"top_k": 300})  # 252 < 300 < 400
    inputs = setup.inputs()
    s_logits, t_logits = leaf_logits(inputs)
    out = method(inputs)
    l1, _, _ = naive_multilevel_ot(setup, s_logits.detach(), t_logits, k=300)
    torch.testing.assert_close(out.parts["token_l1"], l1 / inputs.num_items, rtol=1e-9, atol=1e-12)


def test_gradients_reach_student_only_and_padding_invariant(tmp_path):
    setup, padded = Setup(), Setup(extra_pad=3)
    method = build_method("multilevel_ot", setup.context(tmp_path))
    out = method(setup.inputs())
    out.loss.backward()
    assert params_with_grad(setup.student) == trainable_names(setup.student)
    assert all(p.grad is None for p in setup.teacher.parameters()) and list(method.parameters()) == []
    again = build_method("multilevel_ot", padded.context(tmp_path))(padded.inputs())
    torch.testing.assert_close(again.loss.detach(), out.loss.detach(), rtol=1e-6, atol=1e-9)  # fp32 CE sums


def test_optimisation_reduces_loss(tmp_path):
    setup = Setup(seed=5)
    method = build_method("multilevel_ot", setup.context(tmp_path))
    losses = optimise_steps(setup, method, steps=6)
    assert losses[-1] < losses[0]
