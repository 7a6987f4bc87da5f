"""SRA: loss, parts and gradients against a naive float64 reference (loops over sequences, spans, tokens, heads),
on two real small tokenizers of different conventions and models of unequal depth; padding, normalisation, bf16,
LoRA, options."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import (
    EXAMPLES,
    MORE_EXAMPLES,
    naive_ce_sum,
    naive_shared,
)
from _kd_helpers import naive_divergence_vec, one_thread
from _repr_helpers import (
    ModelPair,
    naive_centre,
    naive_last_token_attention,
    naive_spans,
    naive_structure,
    naive_weighted_distance,
    trainable,
)

from dwakd.methods import MethodContext, build_method
from dwakd.methods.base import OptionError


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


class Pair(ModelPair):
    """Byte-level BPE teacher (Qwen2, 3 layers, d 24) and Metaspace BPE student (GPT-2, 2 layers, d 16)."""

    def __init__(self, extra_pad: int = 0):
        super().__init__(EXAMPLES + MORE_EXAMPLES, extra_pad)


@pytest.fixture(scope="module")
def pair():
    return Pair()


def build(pair: Pair, **options):
    torch.manual_seed(0)
    return build_method("sra", pair.context(), options).double()


def naive_sra(method, inputs, pair: Pair, attention: bool = True) -> dict[str, torch.Tensor]:
    """SRA's loss by loops (float64): spans, centres, saliency, span/geo/logit terms, token-weighted batch mean."""
    o = method.options
    s, t = inputs.student, inputs.teacher
    n = float(inputs.num_items)
    batch = s.input_ids.shape[0]
    t_shared, s_shared = naive_shared(pair)
    W_s = pair.student.get_output_embeddings().weight.double()[s_shared]
    W_t = pair.teacher.get_output_embeddings().weight.double()[t_shared]
    spans = [naive_spans(s, t, b) for b in range(batch)]
    tokens = [int(s.label_mask[b].sum()) for b in range(batch)]
    zero = torch.zeros((), dtype=torch.float64)
    span_total, geo, logit = zero, zero, zero
    lambdas = [w / sum(o.layer_weights or [1.0] * len(method.layer_pairs)) for w in
               (o.layer_weights or [1.0] * len(method.layer_pairs))]
    for k, ((ls, lt), lam) in enumerate(zip(method.layer_pairs, lambdas)):
        W = method.projectors[k].weight.double()
        last = k == len(method.layer_pairs) - 1
        for b in range(batch):
            s_map, t_map, count = spans[b]
            if attention:
                w_s = naive_last_token_attention(inputs.student_out.attentions[ls - 1], s.attention_mask, b)
                w_t = naive_last_token_attention(inputs.teacher_out.attentions[lt - 1], t.attention_mask, b)
            else:
                w_s = [float(v) for v in s.attention_mask[b]]
                w_t = [float(v) for v in t.attention_mask[b]]
            c_s, c_t, sal = [], [], []
            for span in range(count):
                cs, _ = naive_centre(inputs.student_out.hidden_states[ls][b],
                                     w_s, [i for i, v in s_map.items() if v == span])
                ct, mass = naive_centre(inputs.teacher_out.hidden_states[lt][b],
                                        w_t, [j for j, v in t_map.items() if v == span])
                c_s.append(cs), c_t.append(ct), sal.append(mass ** o.saliency_power if attention else 1.0)
            share = tokens[b] / n
            span_total = span_total + lam * share * naive_weighted_distance([W @ c for c in c_s], c_t, sal)
            if last:
                geo = geo + share * naive_structure(c_s, c_t, sal)
                kls = [naive_divergence_vec(W_s @ cs, W_t @ ct, "fkl", o.kd_temperature) for cs, ct in zip(c_s, c_t)]
                logit = logit + share * sum(kls) / len(kls)
    ce = naive_ce_sum(inputs.student_out.logits.double(), s.labels, len(pair.s_tok)) / n
    kd = o.span_weight * span_total + o.geo_weight * geo + o.logit_weight * logit
    return {"ce": ce, "span": span_total, "geo": geo, "logit": logit, "kd": kd,
            "loss": (1 - o.kd_rate) * ce + o.kd_rate * kd}


@pytest.mark.parametrize("options", [
    {"layer_pairs": [[1, 1], [2, 3]], "layer_weights": [1.0, 3.0]},
    {},  # default map: the final layers only for these depths
    {"layer_pairs": [[2, 2]], "saliency_power": 0.5, "kd_temperature": 1.5, "geo_weight": 3.0},
])
def test_loss_parts_and_gradients_match_reference(pair: Pair, options: dict) -> None:
    method = build(pair, **options)
    out = method(pair.inputs())
    ref = naive_sra(method, pair.inputs(), pair)
    assert out.stats["spans_per_sequence"].item() > 3
    for name in ("span", "geo", "logit", "kd"):
        assert out.parts[name].item() == pytest.approx(ref[name].item(), rel=1e-9, abs=1e-14), name
        assert out.parts[name].item() > 0, name
    assert out.parts["ce"].item() == pytest.approx(ref["ce"].item(), rel=1e-6)  # CE in fp32 (shared helper)
    assert out.loss.item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    params = trainable(method, pair.student)
    got = torch.autograd.grad(out.loss, [p for _, p in params], allow_unused=True)
    want = torch.autograd.grad(ref["loss"], [p for _, p in params], allow_unused=True)
    for (name, _), g, w in zip(params, got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8, msg=name)
    assert all(g is not None and g.abs().sum() > 0 for (name, _), g in zip(params, got) if "projectors" in name)
    assert all(p.grad is None for p in pair.teacher.parameters())


def test_uniform_weighting_matches_reference(pair: Pair) -> None:
    method = build(pair, attention_weighting=False, layer_pairs=[[1, 2], [2, 3]])
    assert not method.needs_attentions
    out = method(pair.inputs())
    ref = naive_sra(method, pair.inputs(), pair, attention=False)
    for name in ("span", "geo", "logit"):
        assert out.parts[name].item() == pytest.approx(ref[name].item(), rel=1e-9), name


def test_padding_does_not_change_the_loss(pair: Pair) -> None:
    method = build(pair)
    tight = method(pair.inputs())
    padded_pair = Pair(extra_pad=3)
    padded = method(padded_pair.inputs())
    for name, value in tight.parts.items():
        assert padded.parts[name].item() == pytest.approx(value.item(), rel=1e-6 if name == "ce" else 1e-9), name


def test_parts_scale_with_the_global_token_count(pair: Pair) -> None:
    """Span terms are weighted by n_b/N: as half of a global batch twice as large, every part halves."""
    method = build(pair)
    local = method(pair.inputs())
    n = int(pair.s_view.label_mask.sum())
    doubled = method(pair.inputs(num_items=2 * n))
    for name, value in local.parts.items():
        assert doubled.parts[name].item() == pytest.approx(value.item() / 2, rel=1e-9), name


def test_bf16_autocast_and_lora_student() -> None:
    from dwakd.models import LoraSpec, apply_lora

    pair = Pair()
    pair.student = apply_lora(pair.student.float(), LoraSpec(r=4, alpha=8, target_modules=["c_attn"]))
    pair.teacher = pair.teacher.float()
    method = build_method("sra", pair.context())
    fp32 = method(pair.inputs()).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(pair.inputs())
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(fp32.item(), rel=5e-2)
    out.loss.backward()
    grads = {n for n, p in pair.student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def test_options_are_checked(pair: Pair) -> None:
    context = pair.context()
    for bad, option in (({"layer_pairs": [[0, 1]]}, "layer_pairs"), ({"layer_pairs": [[1, 9]]}, "layer_pairs"),
                        ({"layer_weights": [1.0, 1.0]}, "layer_weights"), ({"layer_weights": [-1.0]}, "layer_weights"),
                        ({"geo_weight": -1.0}, "geo_weight"), ({"kd_objective": "kl"}, "kd_objective"),
                        ({"num_layer_pairs": 0}, "num_layer_pairs")):
        with pytest.raises(OptionError, match=f"method.options.{option}"):
            build_method("sra", context, bad)
    with pytest.raises(ValueError, match="both tokenizers"):
        build_method("sra", MethodContext(pair.student.config, pair.teacher.config, None, None))
    build_method("sra", MethodContext(pair.student.config, pair.teacher.config, None, None), {"logit_weight": 0.0})
