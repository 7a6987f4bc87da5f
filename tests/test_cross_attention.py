"""Cross-model attention (docs/methods.md §4.1–4.3): scores, masks, both softmax directions, projectors, vs loops."""

from __future__ import annotations

import math

import pytest
import torch
from _kd_helpers import (
    make_batch,
    naive_std,
    one_thread,
    run_models,
    tiny_opt_student,
    tiny_student,
    tiny_teacher,
    valid_positions,
)
from transformers import GPT2Config, LlamaConfig, OPTConfig

from dwakd.modules.cross_attention import (
    MASK_VALUE,
    cross_model_attention,
    masked_global_std,
)
from dwakd.modules.projectors import DualSpaceProjectors, ModelDims, model_dims


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one torch thread (restored afterwards)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def setup():
    student, teacher = tiny_student(), tiny_teacher()
    torch.manual_seed(5)
    projectors = DualSpaceProjectors(model_dims(student.config), model_dims(teacher.config)).double()
    inputs = run_models(student, teacher, make_batch(extra_pad_teacher=2))
    cma = cross_model_attention(projectors, inputs.student, inputs.teacher, inputs.student_out, inputs.teacher_out)
    return student, teacher, projectors, inputs, cma


def test_scores_masks_and_both_softmax_directions(setup) -> None:
    student, teacher, proj, inputs, cma = setup
    s, t = inputs.student, inputs.teacher
    E_s = student.get_input_embeddings().weight.detach()
    E_t = teacher.get_input_embeddings().weight.detach()
    h_s = inputs.student_out.hidden_states[-1].detach()
    h_t = inputs.teacher_out.hidden_states[-1]
    B, n, m = cma.scores.shape
    S = [valid_positions(s, b) for b in range(B)]
    T = [valid_positions(t, b) for b in range(B)]
    keys = {(b, j): torch.cat([E_t[t.input_ids[b, j]], E_t[t.labels[b, j]]]) for b in range(B) for j in T[b]}
    sd_k = naive_std(list(keys.values()))
    sd_e = naive_std([E_t[t.labels[b, j]] for b in range(B) for j in T[b]])
    sd_h = naive_std([h_t[b, j] for b in range(B) for j in T[b]])
    W = lambda layer, x: layer.weight.detach() @ x + layer.bias.detach()  # noqa: E731

    for b in range(B):
        raw = {}
        for i in range(n):
            x_id, y_id = (s.input_ids[b, i], s.labels[b, i]) if i in S[b] else (0, 0)
            q = W(proj.query, torch.cat([E_s[x_id], E_s[y_id]]))
            for j in range(m):
                if i in S[b] and j in T[b]:
                    raw[(i, j)] = float(q @ keys[(b, j)]) / sd_k / math.sqrt(2 * 24)
                    assert cma.scores[b, i, j].item() == pytest.approx(raw[(i, j)], rel=1e-10, abs=1e-12)
                else:  # an invalid side: the score carries the −1e5 mask
                    assert cma.scores[b, i, j].item() < MASK_VALUE / 2
        # student space: softmax over teacher positions, zero weight on invalid teacher positions
        for i in S[b]:
            e = {j: math.exp(raw[(i, j)]) for j in T[b]}
            total = sum(e.values())
            for j in range(m):
                assert cma.t2s_attn[b, i, j].item() == pytest.approx(e.get(j, 0.0) / total, rel=1e-10, abs=1e-14)
            v = sum((e[j] / total) * W(proj.t2s, h_t[b, j] / sd_h + E_t[t.labels[b, j]] / sd_e) for j in T[b])
            torch.testing.assert_close(cma.t2s_hidden[b, i].detach(), v, rtol=1e-10, atol=1e-12)
        # teacher space: softmax over student positions of the transposed scores
        for j in T[b]:
            e = {i: math.exp(raw[(i, j)]) for i in S[b]}
            total = sum(e.values())
            for i in range(n):
                assert cma.s2t_attn[b, j, i].item() == pytest.approx(e.get(i, 0.0) / total, rel=1e-10, abs=1e-14)
            v = sum((e[i] / total) * W(proj.s2t, h_s[b, i]) for i in S[b])
            torch.testing.assert_close(cma.s2t_hidden[b, j].detach(), v, rtol=1e-10, atol=1e-12)


def test_dynamic_padding_does_not_change_valid_entries(setup) -> None:
    student, teacher, proj, _, cma = setup
    wider = run_models(student, teacher, make_batch(extra_pad_student=3, extra_pad_teacher=5))
    other = cross_model_attention(proj, wider.student, wider.teacher, wider.student_out, wider.teacher_out)
    n, m = cma.scores.shape[1:]
    valid = cma.student_mask.unsqueeze(-1) & cma.teacher_mask.unsqueeze(1)
    torch.testing.assert_close(other.scores[:, :n, :m][valid], cma.scores[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other.t2s_hidden[:, :n][cma.student_mask], cma.t2s_hidden[cma.student_mask])


def test_gradients_reach_query_and_value_projectors_only_through_their_paths(setup) -> None:
    _, _, proj, inputs, cma = setup
    t2s_grads = torch.autograd.grad(cma.t2s_hidden[cma.student_mask].sum(), list(proj.parameters()), allow_unused=True)
    names = [n for n, _ in proj.named_parameters()]
    got = {n for n, g in zip(names, t2s_grads, strict=True) if g is not None and g.abs().sum() > 0}
    assert got == {"t2s.weight", "t2s.bias", "query.weight", "query.bias"}


def test_scores_stay_fp32_under_bf16_autocast() -> None:
    student, teacher = tiny_student(dtype=torch.float32), tiny_teacher(dtype=torch.float32)
    proj = DualSpaceProjectors(model_dims(student.config), model_dims(teacher.config))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = run_models(student, teacher, make_batch())
        cma = cross_model_attention(proj, inputs.student, inputs.teacher, inputs.student_out, inputs.teacher_out)
    assert cma.scores.dtype == torch.float32 and cma.t2s_attn.dtype == torch.float32
    rows = cma.t2s_attn[cma.student_mask].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_masked_global_std_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    want = naive_std([x[b, i] for b in range(2) for i in range(5) if mask[b, i]])
    assert masked_global_std(x, mask).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masked_global_std_edge_counts_and_dtype(dtype) -> None:
    """Fewer than two entries: 1 (no NaN from n − 1 = 0); a bf16 input gives an fp32 std of its values."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, generator=gen).to(dtype)
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert masked_global_std(x, none).item() == 1.0
    one = none.clone()
    one[1, 2] = True
    x1 = x[..., :1]  # a single valid entry
    assert masked_global_std(x1, one).item() == 1.0
    two = one.clone()
    two[0, 0] = True
    want = naive_std([x1[0, 0].double(), x1[1, 2].double()])
    got = masked_global_std(x1, two)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_model_dims_and_projector_shapes() -> None:
    assert model_dims(GPT2Config(n_embd=32)) == ModelDims(32, 32)
    assert model_dims(LlamaConfig(hidden_size=48, num_attention_heads=4)) == ModelDims(48, 48)
    # OPT-350m style: 1024 hidden, but embeddings, final hidden state and head are 512 wide
    assert model_dims(OPTConfig(hidden_size=64, word_embed_proj_dim=32)) == ModelDims(32, 32)
    proj = DualSpaceProjectors(ModelDims(16, 12), ModelDims(24, 24))
    shapes = {n: tuple(p.shape) for n, p in proj.named_parameters()}
    assert shapes == {
        "t2s.weight": (16, 24), "t2s.bias": (16,), "s2t.weight": (24, 16), "s2t.bias": (24,),
        "query.weight": (48, 24), "query.bias": (48,),
    }
    with pytest.raises(ValueError, match="widths must match"):
        DualSpaceProjectors(ModelDims(16, 16), ModelDims(24, 12))


def test_opt_student_with_narrow_embeddings_runs() -> None:
    student, teacher = tiny_opt_student(proj_dim=12), tiny_teacher()
    dims = model_dims(student.config)
    assert dims == ModelDims(12, 12) and student.config.hidden_size == 16
    proj = DualSpaceProjectors(dims, model_dims(teacher.config)).double()
    inputs = run_models(student, teacher, make_batch())
    cma = cross_model_attention(proj, inputs.student, inputs.teacher, inputs.student_out, inputs.teacher_out)
    assert cma.t2s_hidden.shape[-1] == student.get_output_embeddings().weight.shape[1] == 12
