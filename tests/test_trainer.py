"""DistillationTrainer: checkpoints round-trip student + projectors + optimizer, global token normalisation,
projector learning rate, logged parts, LoRA students, non-finite losses."""

from __future__ import annotations

import math

import pytest
import torch
from _toy_method import ToyProjectorKD  # noqa: F401  (registers "toy-projector-test")
from safetensors.torch import load_file

from dwakd.config import load_config
from dwakd.run import build_training, train
from dwakd.trainer import METHOD_WEIGHTS_NAME, NonFiniteLossError

NO_DROPOUT = ("{arch: gpt2, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_positions: 128, "
              "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}")


def tiny_config(tiny_yaml, *overrides):
    base = [
        "method=toy-projector-test", f"student.tiny={NO_DROPOUT}", "data.max_length=48", "data.max_prompt_length=24",
        "data.max_train_examples=24", "data.eval=null", "training.per_device_train_batch_size=4",
        "training.logging_steps=1", "training.max_steps=3",
        "teacher.tiny={arch: qwen2, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
        "intermediate_size: 64, max_positions: 128}",
    ]
    return load_config(tiny_yaml, base + list(overrides))


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_checkpoint_has_hf_student_and_method_state(tiny_yaml, tmp_path):
    out = tmp_path / "ckpt-run"
    config = tiny_config(tiny_yaml, f"output_dir={out}", "training.save_strategy=steps", "training.save_steps=3")
    result = train(config, show_progress=False)
    ckpt = out / "checkpoint-3"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / METHOD_WEIGHTS_NAME).is_file()
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "tokenizer.json").is_file()
    method_file = load_file(str(ckpt / METHOD_WEIGHTS_NAME))
    assert set(method_file) == {"proj.weight", "proj.bias"}
    # the checkpoint is a plain Hugging Face model dir
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    run = build_training(config, show_progress=False)
    run.trainer._load_from_checkpoint(str(ckpt))
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, run.model.student.state_dict()[name]), name
    assert torch.equal(run.model.method.proj.weight.detach(), method_file["proj.weight"])
    logged = [entry for entry in result["log_history"] if "loss" in entry]
    assert logged and all({"ce", "mse", "mean_norm"} <= set(entry) for entry in logged)
    assert all(math.isclose(e["loss"], e["ce"] + e["mse"], rel_tol=1e-3, abs_tol=1e-3) for e in logged)


@pytest.mark.parametrize("extra", [(), ("student.lora={r: 4, alpha: 8, dropout: 0.0}",
                                          "training.gradient_checkpointing=true")], ids=["full", "lora-checkpointing"])
def test_resume_continues_exactly(tiny_yaml, tmp_path, extra):
    """Resume from a step-3 checkpoint repeats the uninterrupted run: weights, losses, optimizer state (a LoRA
    student's checkpoint holds only its adapter, next to the method's projector)."""
    full = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'full'}", "training.max_steps=6", *extra)
    full_run = build_training(full, show_progress=False)
    full_run.trainer.train()
    part = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'part'}", "training.max_steps=6",
                       "training.save_strategy=steps", "training.save_steps=3", *extra)
    part_run = build_training(part, show_progress=False)
    part_run.trainer.train()
    resumed = build_training(part, show_progress=False)
    resumed.trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    before = params(build_training(full, show_progress=False).model)  # the initialisation
    moved = set()
    for name, value in params(full_run.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
        if not torch.equal(value, before[name]):
            moved.add(name)
    assert any("proj" in n for n in moved) and any(n.startswith("student.") for n in moved), moved
    if extra:
        assert all("lora_" in n for n in moved if n.startswith("student."))
    full_losses = [e["loss"] for e in full_run.trainer.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.trainer.state.log_history if "loss" in e]
    assert resumed_losses[-3:] == pytest.approx(full_losses[-3:], rel=1e-5)
    # optimizer state came back too (Adam moments of the projector are non-zero and equal)
    a = full_run.trainer.optimizer.state[full_run.model.method.proj.weight]["exp_avg_sq"]
    b = resumed.trainer.optimizer.state[resumed.model.method.proj.weight]["exp_avg_sq"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_gradient_accumulation_equals_big_batch(tiny_yaml, tmp_path):
    """Token-level normalisation over the global batch: 2 micro-batches of 2 == 1 batch of 4 (docs/methods.md).

    Compared: the accumulated (and clipped) gradients as the optimizer receives them, and the logged loss. Not the
    weights after an Adam step: Adam divides by sqrt(v) ~ |g| on the first step, so float-reordering noise in a
    near-zero gradient entry becomes a full-size update whose sign depends on the torch build.
    """
    big = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'a'}", "training.max_steps=1")
    small = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'b'}", "training.max_steps=1",
                        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2")
    runs = [build_training(c, show_progress=False) for c in (big, small)]
    grads = []
    for run in runs:
        captured: dict[str, torch.Tensor] = {}

        def keep_grads(optimizer, args, kwargs, model=run.model, captured=captured):
            captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

        run.trainer.create_optimizer().register_step_pre_hook(keep_grads)
        run.trainer.train()
        grads.append(captured)
    a, b = grads
    assert set(a) == set(b) and len(a) == sum(p.requires_grad for p in runs[0].model.parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    la = [e["loss"] for e in runs[0].trainer.state.log_history if "loss" in e]
    lb = [e["loss"] for e in runs[1].trainer.state.log_history if "loss" in e]
    assert la == pytest.approx(lb, rel=1e-4)


def test_projector_group_learning_rate_and_no_teacher_params(tiny_yaml, tmp_path):
    config = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'o'}", "method.projector_lr=0.0123")
    run = build_training(config, show_progress=False)
    optimizer = run.trainer.create_optimizer()
    proj = {id(p) for p in run.model.method.parameters()}
    teacher = {id(p) for p in run.model.teacher.parameters()}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert not ids & teacher
        if ids & proj:
            assert ids <= proj and group["lr"] == 0.0123
        else:
            assert group["lr"] == run.trainer.args.learning_rate
    biases = [g for g in optimizer.param_groups if any(p is run.model.method.proj.bias for p in g["params"])]
    assert biases[0]["weight_decay"] == 0.0
    assert not any(p.requires_grad for p in run.model.teacher.parameters()) and not run.model.teacher.training
    assert all(not name.startswith("teacher") for name in run.model.state_dict())


def test_lora_student_round_trip(tiny_yaml, tmp_path):
    out = tmp_path / "lora"
    config = tiny_config(tiny_yaml, f"output_dir={out}", "student.lora={r: 4, alpha: 8, dropout: 0.0}",
                         "training.save_strategy=steps", "training.save_steps=3")
    train(config, show_progress=False)
    ckpt = out / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").is_file()
    trained = load_file(str(ckpt / "adapter_model.safetensors"))
    run = build_training(config, show_progress=False)
    run.trainer._load_from_checkpoint(str(ckpt))
    state = run.model.student.state_dict()
    for key, value in trained.items():
        match = [k for k in state if k.replace(".default", "") == key]
        assert match and torch.equal(state[match[0]], value), key


def test_teacher_adapter_is_merged_and_leaves_the_initialisation_alone(tiny_yaml, tmp_path):
    """`teacher.adapter` merges a LoRA adapter into the teacher: the teacher equals the same adapter merged and saved,
    and the student side (student, projectors) starts from the same draw as with that merged teacher (PEFT's layer
    init must not consume the run's RNG; a teacher cache, which loads no adapter, relies on it)."""
    from peft import LoraConfig, get_peft_model

    from dwakd.models import build_tiny_model
    from dwakd.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(load_config(tiny_yaml).teacher.tokenizer)
    base = build_tiny_model("qwen2", len(tokenizer), seed=1, hidden_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, intermediate_size=64, max_positions=128)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    def built(*teacher):
        config = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'out'}", "method=dskd", "teacher.tiny=null",
                             "teacher.tokenizer=null", *teacher)
        return build_training(config, show_progress=False).model

    with_adapter = built(f"teacher.name_or_path={tmp_path / 'base'}", f"teacher.adapter={tmp_path / 'adapter'}")
    merged = built(f"teacher.name_or_path={tmp_path / 'merged'}")
    plain = built(f"teacher.name_or_path={tmp_path / 'base'}")
    for name, value in merged.teacher.state_dict().items():
        assert torch.equal(with_adapter.teacher.state_dict()[name], value), name
    assert any(not torch.equal(plain.teacher.state_dict()[k], v) for k, v in merged.teacher.state_dict().items())
    for name, value in params(merged).items():  # the student and the method's projectors
        assert torch.equal(params(with_adapter)[name], value), name


def test_nonfinite_loss_stops_naming_the_part(tiny_yaml, tmp_path):
    config = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'n'}", "method.options={nan_at_call: 2}")
    run = build_training(config, show_progress=False)
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*part\(s\) mse, loss"):
        run.trainer.train()


def test_nonfinite_loss_skip_policy(tiny_yaml, tmp_path):
    config = tiny_config(tiny_yaml, f"output_dir={tmp_path / 's'}", "method.options={nan_at_call: 2}",
                         "method.on_nonfinite=skip")
    run = build_training(config, show_progress=False)
    run.trainer.train()
    assert run.trainer.skipped_micro_batches == 1
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_cudnn_attention_is_turned_off_for_cuda_runs_only(monkeypatch):
    """cuDNN SDPA rebuilds a graph per batch shape (dynamic padding): off for CUDA runs unless asked to keep it."""
    from dwakd.models import CUDNN_ATTENTION_ENV, configure_attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.delenv(CUDNN_ATTENTION_ENV, raising=False)
        assert configure_attention_backends(False) is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setenv(CUDNN_ATTENTION_ENV, "1")
        assert configure_attention_backends(True) is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setenv(CUDNN_ATTENTION_ENV, "0")
        assert configure_attention_backends(True) is True and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_group_by_length_pads_less_and_keeps_every_example(tiny_yaml, tmp_path):
    lengths_of = {}
    padded = {}
    for grouped in (False, True):
        config = tiny_config(tiny_yaml, f"output_dir={tmp_path / str(grouped)}", "data.max_train_examples=null",
                             f"data.group_by_length={str(grouped).lower()}")
        run = build_training(config, show_progress=False)
        lengths = run.train_dataset.lengths()
        lengths_of[grouped] = lengths
        sampler = run.trainer._get_train_sampler()
        order = list(iter(sampler))
        assert sorted(order) == list(range(len(lengths)))  # every example once per epoch
        batch = run.trainer.args.train_batch_size
        batches = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
        padded[grouped] = sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(
            lengths[i] for b in batches for i in b)
    assert lengths_of[True] == lengths_of[False]
    assert padded[True] < padded[False] - 0.05, padded  # the tiny data pads ~20-40 % at random, ~2 % grouped


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    from dwakd.trainer import LengthGroupedSampler

    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    a, b = LengthGroupedSampler(lengths, 8, seed=3), LengthGroupedSampler(lengths, 8, seed=3)
    assert list(a) == list(a) == list(b)  # a second pass or another rank: the same order
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    assert list(LengthGroupedSampler(lengths, 8, seed=4)) != first
    # batches of near-equal length, in random order (not a long-to-short walk through each megabatch)
    batches = [first[i:i + 8] for i in range(0, len(first), 8)]
    longest = [max(lengths[i] for i in b) for b in batches]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 6  # ~17 at random
    descents = sum(a >= b for a, b in zip(longest, longest[1:]))
    assert 0.25 < descents / (len(longest) - 1) < 0.75, longest


def test_resume_with_group_by_length_continues_exactly(tiny_yaml, tmp_path):
    common = ["data.group_by_length=true", "training.max_steps=8", "data.max_train_examples=16"]  # 2 epochs
    full = build_training(tiny_config(tiny_yaml, f"output_dir={tmp_path / 'full'}", *common), show_progress=False)
    full.trainer.train()
    part = tiny_config(tiny_yaml, f"output_dir={tmp_path / 'part'}", *common, "training.save_strategy=steps",
                       "training.save_steps=5")
    build_training(part, show_progress=False).trainer.train()
    resumed = build_training(part, show_progress=False)
    resumed.trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-5"))
    for name, value in params(full.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
