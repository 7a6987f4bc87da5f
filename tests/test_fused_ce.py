"""The student CE through the fused LM head op (`student_cross_entropy_sum`, used by sft and sra) equals the dense
path: value and gradients of the student, float64 and fp32, a head with padding rows; dense-logit views and
`head_fusion: dense` keep the dense path."""

from __future__ import annotations

import pytest
import torch
from _baseline_helpers import EXAMPLES, MORE_EXAMPLES, Setup, deferred, student_grads
from _kd_helpers import one_thread, record_fused_calls
from _repr_helpers import ModelPair

import dwakd.modules.cross_entropy as cross_entropy
from dwakd.methods import build_method
from dwakd.methods.base import DistillationInputs, OptionError
from dwakd.modules.cross_entropy import student_cross_entropy_sum


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Counts the fused op's calls from the CE helper (proves which path ran)."""
    return record_fused_calls(monkeypatch, cross_entropy)


def assert_grads_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        assert float((got[name] - grad).abs().max()) <= rtol * float(grad.abs().max()), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_ce_equals_dense(dtype, fused_calls):
    setup = Setup()
    setup.student.to(dtype)
    assert setup.student.get_output_embeddings().weight.shape[0] > len(setup.s_tok)  # padding rows in the head
    results = {}
    for mode in ("dense", "fused"):
        view = deferred(setup.inputs(hidden=True).student_out)
        ce = student_cross_entropy_sum(view, setup.s_view, mode)
        results[mode] = ce.detach(), student_grads(setup.student, ce)
    assert fused_calls == [None]  # one fused call, CE only; the dense mode made none
    # the dense path's CE runs in fp32 (`.float()`), the fused op in the input's dtype
    torch.testing.assert_close(results["fused"][0], results["dense"][0].to(results["fused"][0].dtype),
                               rtol=1e-6, atol=0)
    assert_grads_close(results["fused"][1], results["dense"][1], 1e-5)


def test_dense_logit_views_and_auto_on_cpu_keep_the_dense_path(fused_calls):
    setup = Setup()
    inputs = setup.inputs(hidden=True)
    student_cross_entropy_sum(inputs.student_out, setup.s_view, "fused")  # dense logits: nothing to fuse
    student_cross_entropy_sum(deferred(inputs.student_out), setup.s_view, "auto")  # auto is dense on CPU
    assert fused_calls == []


def test_sft_fused_equals_dense(tmp_path, fused_calls):
    setup = Setup(student_arch="llama")
    out = {}
    for mode in ("dense", "fused"):
        method = build_method("sft", setup.context(tmp_path), {"head_fusion": mode})
        inputs = setup.inputs(hidden=True)
        inputs = DistillationInputs(inputs.student, None, deferred(inputs.student_out), None, inputs.num_items)
        result = method(inputs)
        out[mode] = result.loss.detach(), result.parts["ce"], student_grads(setup.student, result.loss)
    assert fused_calls == [None]
    torch.testing.assert_close(out["fused"][0], out["dense"][0].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["fused"][1], out["dense"][1].double(), rtol=1e-6, atol=0)
    assert_grads_close(out["fused"][2], out["dense"][2], 1e-5)


def test_sra_fused_equals_dense(fused_calls):
    pair = ModelPair(EXAMPLES + MORE_EXAMPLES)
    out = {}
    for mode in ("dense", "fused"):
        torch.manual_seed(0)
        method = build_method("sra", pair.context(), {"head_fusion": mode}).double()
        inputs = pair.inputs()
        inputs.student_out = deferred(inputs.student_out)
        result = method(inputs)
        out[mode] = {k: v.detach() for k, v in result.parts.items()}, student_grads(pair.student, result.loss)
    assert fused_calls == [None]
    assert out["fused"][0].keys() == out["dense"][0].keys()
    for name, value in out["dense"][0].items():
        torch.testing.assert_close(out["fused"][0][name], value.to(out["fused"][0][name].dtype), rtol=1e-6, atol=1e-12)
    assert_grads_close(out["fused"][1], out["dense"][1], 1e-5)


@pytest.mark.parametrize("name", ["sft", "sra"])
def test_head_fusion_is_validated(tmp_path, name):
    setup = Setup() if name == "sft" else ModelPair(EXAMPLES)
    context = setup.context(tmp_path) if name == "sft" else setup.context()
    with pytest.raises(OptionError, match="head_fusion"):
        build_method(name, context, {"head_fusion": "chunked"})
