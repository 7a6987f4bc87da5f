"""ULD against a naive per-position implementation; gradients; padding invariance; optimisation."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import Setup, leaf_logits, naive_ce_sum, optimise_steps, params_with_grad, trainable_names

from dwakd.methods import build_method, method_names
from dwakd.methods.uld import uld_distance_sum


def naive_uld_sum(s_logits, t_logits, s_labels, t_labels, vs, vt) -> torch.Tensor:
    """Loop over sequences and index-paired response positions; sort, zero-pad to the larger vocab, L1."""
    total = s_logits.new_zeros(())
    width = max(vs, vt)
    for b in range(s_labels.shape[0]):
        s_pos = [i for i in range(s_labels.shape[1]) if s_labels[b, i] != -100]
        t_pos = [j for j in range(t_labels.shape[1]) if t_labels[b, j] != -100]
        for i, j in zip(s_pos, t_pos):  # zip stops at min(n, m)
            p = torch.sort(torch.softmax(s_logits[b, i, :vs], -1), descending=True).values
            q = torch.sort(torch.softmax(t_logits[b, j, :vt].detach(), -1), descending=True).values
            p = torch.cat([p, p.new_zeros(width - vs)])
            q = torch.cat([q, q.new_zeros(width - vt)])
            total = total + (p - q).abs().sum()
    return total


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_registered():
    assert "uld" in method_names()


def test_loss_and_gradients_match_naive(setup, tmp_path):
    method = build_method("uld", setup.context(tmp_path), {"kd_rate": 0.3})
    inputs = setup.inputs()
    s_logits, t_logits = leaf_logits(inputs)
    out = method(inputs)
    vs, vt, n = inputs.student_out.vocab_size, inputs.teacher_out.vocab_size, inputs.num_items
    s_ref = s_logits.detach().clone().requires_grad_(True)
    ce = naive_ce_sum(s_ref, setup.s_view.labels, vs) / n
    kd = naive_uld_sum(s_ref, t_logits, setup.s_view.labels, setup.t_view.labels, vs, vt) / n
    ref = 0.7 * ce + 0.3 * kd
    torch.testing.assert_close(out.parts["uld"], kd.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-9)  # the shared CE helper runs in fp32
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s_logits.grad, s_ref.grad, rtol=1e-5, atol=1e-8)
    assert t_logits.grad is None  # the teacher is a fixed target
    assert s_logits.grad[..., vs:].abs().sum() == 0  # head padding rows never count
    assert s_logits.grad[~setup.s_view.label_mask].abs().sum() == 0  # prompt and padding never count


def test_chunking_does_not_change_value_or_gradient(setup):
    inputs = setup.inputs()
    s = inputs.student_out.logits.detach().clone().requires_grad_(True)
    t = inputs.teacher_out.logits.detach()
    from dwakd.methods.uld import paired_rows

    s_rows, t_rows = paired_rows(setup.s_view.label_mask, setup.t_view.label_mask)
    whole = uld_distance_sum(s, t, s_rows, t_rows, inputs.student_out.vocab_size, inputs.teacher_out.vocab_size)
    (g_whole,) = torch.autograd.grad(whole, s)
    chunked = uld_distance_sum(s, t, s_rows, t_rows, inputs.student_out.vocab_size, inputs.teacher_out.vocab_size,
                               chunk_elements=8 * 400)  # 8 rows per chunk
    (g_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-12, atol=1e-12)


def test_torch_sort_path_matches_numpy_path(setup, monkeypatch):
    """CUDA tensors sort with torch, CPU tensors with NumPy: both give the same value and gradient."""
    import dwakd.ops.fused_kd.sorted_l1 as sorted_l1
    from dwakd.methods.uld import paired_rows

    inputs = setup.inputs()
    t = inputs.teacher_out.logits.detach()
    s_rows, t_rows = paired_rows(setup.s_view.label_mask, setup.t_view.label_mask)
    results = []
    for use_numpy in (True, False):
        monkeypatch.setattr(sorted_l1, "NUMPY_SORT_ON_CPU", use_numpy)
        s = inputs.student_out.logits.detach().clone().requires_grad_(True)
        value = uld_distance_sum(s, t, s_rows, t_rows, inputs.student_out.vocab_size, inputs.teacher_out.vocab_size)
        results.append((value, torch.autograd.grad(value, s)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def test_gradients_reach_student_only_and_padding_invariant(tmp_path):
    setup = Setup(extra_pad=0)
    padded = Setup(extra_pad=4)
    method = build_method("uld", setup.context(tmp_path))
    out = method(setup.inputs())
    out.loss.backward()
    assert params_with_grad(setup.student) == trainable_names(setup.student)
    assert all(p.grad is None for p in setup.teacher.parameters())
    assert list(method.parameters()) == []
    torch.testing.assert_close(build_method("uld", padded.context(tmp_path))(padded.inputs()).loss.detach(),
                               out.loss.detach(), rtol=1e-6, atol=1e-9)  # fp32 CE sums


def test_optimisation_reduces_loss(tmp_path):
    setup = Setup(seed=3)
    method = build_method("uld", setup.context(tmp_path))
    losses = optimise_steps(setup, method, steps=6)
    assert losses[-1] < losses[0]
