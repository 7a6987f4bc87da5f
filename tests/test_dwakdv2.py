"""DWA-KDv2 against naive loops: weights on DSKDv2's pairs, alignment-informed band, Soft-DTW terms, exactness."""

from __future__ import annotations

import math

import pytest
import torch
from _baseline_helpers import (
    linked_setup,
    naive_ce_sum,
    naive_exact_pairs,
    naive_shared,
    optimise_steps,
    params_with_grad,
    trainable_names,
)

from dwakd.methods import build_method, method_names
from dwakd.modules.band import alignment_attention

# ---------------------------------------------------------------- naive references (plain Python)


def compact_positions(labels, b):
    return [i for i in range(labels.shape[1]) if labels[b, i] != -100]


def naive_attention_rows(setup, b) -> list[list[float]]:
    """Compact (n_b × m_b) pseudo-attention: one-hot on the exact partner, uniform over the gap between anchors."""
    s_pos, t_pos = compact_positions(setup.s_view.labels, b), compact_positions(setup.t_view.labels, b)
    partner = {s_pos.index(i): t_pos.index(j) for bb, i, j in naive_exact_pairs(setup.s_view, setup.t_view) if bb == b}
    rows = []
    for k in range(len(s_pos)):
        if k in partner:
            lo = hi = partner[k]
        else:
            before = [partner[a] for a in partner if a < k]
            after = [partner[a] for a in partner if a > k]
            prev, nxt = (max(before) if before else None), (min(after) if after else None)
            lo = prev + 1 if prev is not None else 0
            hi = nxt - 1 if nxt is not None else len(t_pos) - 1
            if lo > hi:
                lo, hi = (prev if prev is not None else 0), (nxt if nxt is not None else len(t_pos) - 1)
        rows.append([1.0 / (hi - lo + 1) if lo <= col <= hi else 0.0 for col in range(len(t_pos))])
    return rows


def naive_band(rows, base=5.0, kappa=2.0, beta=0.7):
    n, m = len(rows), len(rows[0])
    out = []
    for i, a in enumerate(rows):
        soft = sum(p * j for j, p in enumerate(a))
        linear = i * (m - 1) / (n - 1) if n > 1 else 0.0
        entropy = -sum(p * math.log(p) for p in a if p > 0)
        out.append((beta * soft + (1 - beta) * linear, base + kappa * entropy))
    return out


def naive_cos_cost(xs, ys, band=None, penalty=1.0):
    """Cosine-distance cost as a list of lists of 0-d tensors (differentiable), band penalty added outside."""
    cost = []
    for i, x in enumerate(xs):
        row = []
        for j, y in enumerate(ys):
            c = 1.0 - (x @ y) / (x.norm() * y.norm())
            if band is not None and abs(j - band[i][0]) > band[i][1]:
                c = c + penalty
            row.append(c)
        cost.append(row)
    return cost


def naive_soft_dtw(cost, gamma):
    """R(n, m) of Soft-DTW by the textbook recursion over 0-d tensors (differentiable)."""
    n, m = len(cost), len(cost[0])
    r = {(0, 0): torch.zeros((), dtype=torch.float64)}
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = [r[k] for k in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if k in r]
            softmin = -gamma * torch.logsumexp(torch.stack([-p / gamma for p in prev]), 0)
            r[(i, j)] = cost[i - 1][j - 1] + softmin
    return r[(n, m)]


def naive_dtw_divergence(xs, ys, gamma, band):
    cross = naive_soft_dtw(naive_cos_cost(xs, ys, band), gamma)
    return cross - 0.5 * (naive_soft_dtw(naive_cos_cost(xs, xs), gamma) + naive_soft_dtw(naive_cos_cost(ys, ys), gamma))


def naive_weighted_kd(setup, method, s_out, t_out, tau, gate=True):
    """(t2s_ce, Σ w·KL_t2s, Σ u·KL_s2t) over DSKDv2's kept pairs, weights rescaled per sequence over those pairs."""
    vs, vt = len(setup.s_tok), len(setup.t_tok)
    t_ids, s_ids = naive_shared(setup)
    to_student = dict(zip(t_ids, s_ids))
    w_s = setup.student.get_output_embeddings().weight[:vs].detach()
    w_t = setup.teacher.get_output_embeddings().weight[:vt].detach()
    part_t = w_t[t_ids].T
    s2t = w_s[s_ids].T @ (part_t.T @ torch.linalg.inv(part_t @ part_t.T))
    h_s, h_t = s_out.hidden_states[-1], t_out.hidden_states[-1]
    t2s_ce = t2s_kd = s2t_kd = h_s.new_zeros(())

    def entropy(logits):
        p = torch.softmax(logits.detach(), -1)
        return float(-(p * p.log()).sum())

    for b in range(setup.s_view.labels.shape[0]):
        rows = []
        for bb, i, j in sorted(naive_exact_pairs(setup.s_view, setup.t_view)):
            pred = int(t_out.logits[b, j, :vt].argmax()) if bb == b else None
            if bb == b and pred in to_student:
                rows.append((i, j, to_student[pred]))
        if not rows:
            continue
        raw_w, raw_u, kl_t2s, kl_s2t = [], [], [], []
        for i, j, target in rows:
            t2s_logits = method.t2s.weight @ h_t[b, j] @ w_s.T
            t2s_ce = t2s_ce - torch.log_softmax(t2s_logits, -1)[target]
            g = float(torch.softmax(t2s_logits.detach(), -1).max()) if gate else 1.0
            raw_w.append(entropy(s_out.logits[b, i, :vs]) / math.log(vs) * g)
            raw_u.append(1.0 - entropy(t_out.logits[b, j, :vt]) / math.log(vt))
            log_p = torch.log_softmax(t2s_logits.detach() / tau, -1)
            kl_t2s.append((log_p.exp() * (log_p - torch.log_softmax(s_out.logits[b, i, :vs] / tau, -1))).sum())
            log_pt = torch.log_softmax(t_out.logits[b, j, :vt] / tau, -1)
            log_q = torch.log_softmax(((h_s[b, i] @ s2t) @ w_t.T) / tau, -1)
            kl_s2t.append((log_pt.exp() * (log_pt - log_q)).sum())
        for k in range(len(rows)):
            t2s_kd = t2s_kd + raw_w[k] * len(rows) / sum(raw_w) * kl_t2s[k]
            s2t_kd = s2t_kd + raw_u[k] * len(rows) / sum(raw_u) * kl_s2t[k]
    return t2s_ce, t2s_kd, s2t_kd


def naive_dtw_terms(setup, method, s_out, t_out, gamma, band_options=None):
    """(Σ D_hid, Σ D_emb) over the batch by loops, differentiable w.r.t. the student and the projectors."""
    hidden = embedding = 0.0
    s_table = setup.student.get_input_embeddings().weight
    t_table = setup.teacher.get_input_embeddings().weight.detach()
    proj = method.dwa.embedding
    for b in range(setup.s_view.labels.shape[0]):
        s_pos, t_pos = compact_positions(setup.s_view.labels, b), compact_positions(setup.t_view.labels, b)
        band = naive_band(naive_attention_rows(setup, b), **band_options) if band_options is not None else None
        xs = [s_out.hidden_states[-1][b, i] for i in s_pos]
        ys = [method.t2s.weight @ t_out.hidden_states[-1][b, j].detach() for j in t_pos]
        hidden = hidden + naive_dtw_divergence(xs, ys, gamma, band)
        xs = [s_table[int(setup.s_view.labels[b, i])] for i in s_pos]
        ys = [proj.weight @ t_table[int(setup.t_view.labels[b, j])] + proj.bias for j in t_pos]
        embedding = embedding + naive_dtw_divergence(xs, ys, gamma, band)
    return hidden, embedding


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def setup():
    return linked_setup()


def test_registered():
    assert "dwakdv2" in method_names()


def test_alignment_attention_matches_naive(tmp_path):
    setup = linked_setup(extra_pad=3)
    method = build_method("dwakdv2", setup.context(tmp_path))
    partner, _ = method.align(setup.s_view, setup.t_view)
    attn = alignment_attention(partner, setup.s_view.label_mask, setup.t_view.label_mask)  # (batch, n, m)
    for b in range(attn.shape[0]):
        s_pos, t_pos = compact_positions(setup.s_view.labels, b), compact_positions(setup.t_view.labels, b)
        compact = attn[b][s_pos][:, t_pos]
        torch.testing.assert_close(compact, torch.tensor(naive_attention_rows(setup, b)), rtol=1e-6, atol=1e-7)
        assert attn[b].sum() == pytest.approx(len(s_pos))  # nothing outside the response block
    assert bool(((attn > 0) & (attn < 1)).any()) and bool((attn == 1).any())  # both kinds of rows occur


@pytest.mark.parametrize("gate", [True, False])
def test_weighted_kd_matches_naive(setup, tmp_path, gate):
    method = build_method("dwakdv2", setup.context(tmp_path), {"dtw": "off", "gate": gate, "kd_temperature": 1.5})
    method = method.double()
    inputs = setup.inputs(hidden=True)
    out = method(inputs)
    n = inputs.num_items
    t2s_ce, t2s_kd, s2t_kd = naive_weighted_kd(setup, method, inputs.student_out, inputs.teacher_out, 1.5, gate)
    for name, value in (("t2s_ce", t2s_ce), ("t2s_kd", t2s_kd), ("s2t_kd", s2t_kd)):
        torch.testing.assert_close(out.parts[name], (value / n).detach(), rtol=1e-7, atol=1e-10)
    ce = naive_ce_sum(inputs.student_out.logits, setup.s_view.labels, len(setup.s_tok))
    ref = 0.5 * ce / n + 0.5 * (t2s_ce + t2s_kd + s2t_kd) / n
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-9)  # the shared CE helper runs in fp32
    params = list(setup.student.parameters()) + [method.t2s.weight]
    got = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


BINDING_BAND = {"band_base": 0.5, "band_sensitivity": 0.1}  # narrow enough to bind on the tiny sequences


def test_dtw_terms_match_naive_values_and_gradients(setup, tmp_path):
    """Soft-DTW terms (values and gradients w.r.t. the student and the projectors) against loops; banded ≠ plain."""
    values = {}
    for dtw in ("plain", "banded"):
        options = {"dtw": dtw, "ce_weight": 0.0, "kd_weight": 0.0, **BINDING_BAND}
        method = build_method("dwakdv2", setup.context(tmp_path), options).double()
        inputs = setup.inputs(hidden=True, progress=0.25)
        out = method(inputs)
        gamma = 2.0 + (0.8 - 2.0) * 0.25
        assert float(out.stats["dtw_gamma"]) == pytest.approx(gamma)
        band = {"base": 0.5, "kappa": 0.1} if dtw == "banded" else None
        with torch.set_grad_enabled(dtw == "banded"):  # gradients checked on the banded run (the full method)
            hidden, embedding = naive_dtw_terms(setup, method, inputs.student_out, inputs.teacher_out, gamma, band)
        n = float(inputs.num_items)
        assert float(out.parts["dtw_hidden"]) == pytest.approx(float(hidden) / n, rel=1e-6, abs=1e-10)
        assert float(out.parts["dtw_embedding"]) == pytest.approx(float(embedding) / n, rel=1e-6, abs=1e-10)
        torch.testing.assert_close(out.loss.detach(), 0.2 * (out.parts["dtw_hidden"] + out.parts["dtw_embedding"]))
        values[dtw] = (float(out.parts["dtw_hidden"]), float(out.parts["dtw_embedding"]))
        if dtw == "plain":
            continue
        params = [p for p in [*setup.student.parameters(), *method.parameters()] if p.requires_grad]
        got = torch.autograd.grad(out.loss, params, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(0.2 * (hidden + embedding) / n, params, allow_unused=True)
        nonzero = 0
        for g, w in zip(got, want, strict=True):
            g = torch.zeros_like(w) if g is None and w is not None else g
            w = torch.zeros_like(g) if w is None and g is not None else w
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)
                nonzero += int(g.abs().sum() > 0)
        assert nonzero >= 3  # student hidden path, embedding table, t2s and P_emb all receive gradient
    assert all(abs(b - p) > 1e-3 * abs(p) for b, p in zip(values["banded"], values["plain"], strict=True))


def test_weights_and_dtw_off_is_dskdv2(setup, tmp_path):
    inputs = setup.inputs(hidden=True)
    ours = build_method("dwakdv2", setup.context(tmp_path), {"token_weights": False, "dtw": "off"}).double()
    base = build_method("dskdv2", setup.context(tmp_path)).double()
    assert dict(ours.named_parameters()).keys() == dict(base.named_parameters()).keys()
    a, b = ours(inputs), base(inputs)
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in b.parts)


def test_gradients_reach_student_and_projectors_only(tmp_path):
    setup = linked_setup()
    method = build_method("dwakdv2", setup.context(tmp_path)).double()
    inputs = setup.inputs(hidden=True)
    teacher_hidden = tuple(h.detach().clone().requires_grad_(True) for h in inputs.teacher_out.hidden_states)
    inputs.teacher_out.hidden_states = teacher_hidden
    method(inputs).loss.backward()
    expected = trainable_names(setup.student) | {"1.t2s.weight", "1.dwa.embedding.weight", "1.dwa.embedding.bias"}
    assert params_with_grad(setup.student, method) == trainable_names(setup.student, method) == expected
    assert all(h.grad is None for h in teacher_hidden) and all(p.grad is None for p in setup.teacher.parameters())


def test_optimisation_reduces_loss(tmp_path):
    setup = linked_setup(seed=7)
    method = build_method("dwakdv2", setup.context(tmp_path)).double()
    losses = optimise_steps(setup, method, steps=6, hidden=True)
    assert losses[-1] < losses[0]
