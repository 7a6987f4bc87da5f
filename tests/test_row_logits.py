"""LM heads applied only at the rows a loss reads (`ModelView.logits_at`) give the dense-logits result.

The trainer runs both models with `logits_to_keep` at the last position (then, once the head has been checked
there, at none) and applies the heads later at label rows;
every method, whether it reads rows or the dense `logits`, must get the same loss, parts and gradients as with dense
logits.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from _spacy_helpers import method_extra

from dwakd.config import load_config
from dwakd.methods import method_names
from dwakd.run import build_training

METHODS = [name for name in method_names() if not name.endswith("-test")]
CLASSES = {"sft", "dskd", "dwakd", "uld", "mined", "multilevel_ot", "dskdv2", "dwakdv2"}  # presets: -m slow
FAST = ["data.max_length=64", "data.max_prompt_length=32", "data.eval=null", "training.max_steps=1",
        "training.per_device_train_batch_size=4"]


def _build(tiny_yaml, tmp_path, method: str, extra: list[str] = ()):
    """`method`, or `method:fused` for a method with `head_fusion: fused` (the CPU default is dense);
    `extra`: further overrides (`method_extra`)."""
    name, _, fusion = method.partition(":")
    extra = [*extra, *([f"method.options.head_fusion={fusion}"] if fusion else [])]
    config = load_config(tiny_yaml, [f"method={name}", f"output_dir={tmp_path / name}", *FAST, *extra])
    run = build_training(config, show_progress=False)
    batch = next(iter(run.trainer.get_train_dataloader()))
    run.model.eval()  # no dropout: the two passes must see the same network
    return run.model, batch


def _loss_and_grads(model, batch, row_logits: bool, recheck: bool = True):
    """(loss and parts, gradients) of one forward/backward; `recheck` forgets the one-time head check."""
    model.row_logits = row_logits
    if recheck:
        model._head_checked = {}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(**batch)
    out["loss"].backward()
    values = {"loss": float(out["loss"].detach())} | {k: float(v) for k, v in out["parts"].items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return values, grads


def _count_head_rows(module: torch.nn.Module, counter: list[int]):
    """Record how many rows each call of `module` (an LM head) receives."""
    return module.register_forward_hook(lambda mod, args, out: counter.append(args[0][..., 0].numel()))


def _check_method(tiny_yaml, tmp_path, method: str, extra: list[str] = ()) -> None:
    """Rows path == dense path (loss, parts, gradients), and no head ever runs at prompt or padding rows."""
    model, batch = _build(tiny_yaml, tmp_path, method, extra)
    dense_values, dense_grads = _loss_and_grads(model, batch, row_logits=False)
    _loss_and_grads(model, batch, row_logits=True)  # the first pass also checks the head at the last position
    assert model._head_checked.get("student") is True  # the deferred head was used (and verified)

    sides = {"student": (model.student, "labels")}
    if model.teacher is not None:
        sides["teacher"] = (model.teacher, "teacher_labels")
    rows: dict[str, list[int]] = {side: [] for side in sides}
    hooks = [_count_head_rows(module.get_output_embeddings(), rows[side]) for side, (module, _) in sides.items()]
    try:
        row_values, row_grads = _loss_and_grads(model, batch, row_logits=True, recheck=False)
    finally:
        for hook in hooks:
            hook.remove()

    assert row_values.keys() == dense_values.keys()
    for key, value in dense_values.items():
        assert row_values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert row_grads.keys() == dense_grads.keys() and dense_grads
    for name, grad in dense_grads.items():
        torch.testing.assert_close(row_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    for side, (_, key) in sides.items():
        labels = int(batch[key].ne(-100).sum())
        assert labels < batch[key].numel()  # prompts and padding exist, so dense logits would be more rows
        # once the first pass has checked the head at the last position, the model's own pass computes no row (its
        # logits would go unread), and the loss at most the label rows
        assert rows[side][0] == 0 and sum(rows[side][1:]) <= labels, (side, rows[side], labels)
        if method.endswith(":fused"):  # the fused op reads the head's weight and never calls the head module
            assert rows[side] == [0]


@pytest.mark.parametrize("method", [*sorted(CLASSES), "dskd:fused", "dwakd:fused", "cdm:fused"])
def test_rows_equal_dense_and_skip_prompts(tiny_yaml, tmp_path, method):
    _check_method(tiny_yaml, tmp_path, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(METHODS) - CLASSES))
def test_presets_rows_equal_dense_and_skip_prompts(tiny_yaml, tmp_path, request, method):
    _check_method(tiny_yaml, tmp_path, method, method_extra(method, request))


def test_head_that_does_not_reproduce_logits_falls_back_to_dense(tiny_yaml, tmp_path, caplog):
    """A model whose logits are not head(final hidden) (scaling, soft-capping) is detected and run densely."""
    model, batch = _build(tiny_yaml, tmp_path, "sft")
    dense_values, dense_grads = _loss_and_grads(model, batch, row_logits=False)
    original = model.student.forward

    @functools.wraps(original)
    def scaled_forward(*args, **kwargs):  # a model that scales its logits after the head
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.student.forward = scaled_forward
    try:
        with caplog.at_level(logging.WARNING, logger="dwakd.trainer"):
            row_values, _ = _loss_and_grads(model, batch, row_logits=True)
        assert model._head_checked["student"] is False
        assert "does not reproduce" in caplog.text
        dense_scaled, _ = _loss_and_grads(model, batch, row_logits=False)
        assert row_values["loss"] == pytest.approx(dense_scaled["loss"], rel=1e-6)
        assert row_values["loss"] != pytest.approx(dense_values["loss"], rel=1e-3)
    finally:
        model.student.forward = original


def test_config_with_logit_transform_never_defers_the_head(tiny_yaml, tmp_path):
    model, batch = _build(tiny_yaml, tmp_path, "sft")
    model.student.config.final_logit_softcapping = 30.0
    try:
        assert model._deferred_head("student", model.student) is None
    finally:
        del model.student.config.final_logit_softcapping
    assert model._deferred_head("student", model.student) is not None


def test_frozen_bf16_teacher_head_is_not_copied_per_sequence(tiny_yaml, tmp_path):
    """The last-position logits of a frozen bf16 teacher cost one row per sequence, not a copy of its head per
    sequence: `logits_to_keep` as the int 1 made `torch.matmul` expand the (V, d) head to (batch, d, V) on the CPU
    (4 × 29 MiB here; 4 × 1.1 GB for a 7B teacher)."""
    from dwakd.evaluation.memory import peak_bytes
    from dwakd.trainer import _token_view

    config = load_config(tiny_yaml, ["method=dskd", f"output_dir={tmp_path / 'bf16'}", *FAST,
                                     "teacher.dtype=bfloat16"])
    run = build_training(config, show_progress=False)
    batch = next(iter(run.trainer.get_train_dataloader()))
    model, view = run.model, _token_view(batch, "teacher_")
    head = model.teacher.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and not head.requires_grad and batch["input_ids"].shape[0] == 4
    model._run_side("teacher", model.teacher, view, True, model.teacher_vocab_size)  # the one-time head check
    with torch.no_grad():
        out, peak = peak_bytes(lambda: model._run_side("teacher", model.teacher, view, True, model.teacher_vocab_size))
    assert out.logits_at(torch.zeros(1, dtype=torch.long)).shape[-1] >= model.teacher_vocab_size
    head_bytes = head.numel() * head.element_size()
    assert peak < head_bytes / 2, f"peak {peak / 2**20:.1f} MiB, head {head_bytes / 2**20:.1f} MiB"
