"""On-policy cross-tokenizer distillation (issue 17): the student's own samples, dual-tokenized like the data, scored
by the teacher on its own tokenization, for every method with a teacher.

Checked here: config errors name `on_policy.KEY`; `fraction: 0` is the off-policy run step by step; with
`fraction: 1` every micro-batch is made of samples whose two views decode to the same text, whose offsets point
into it, whose labels are exactly the sampled response (+ EOS when sampled) and whose teacher forward saw the
teacher's tokenization; the token count that normalises the loss is the count of the batches actually trained on
(gradient accumulation); resume repeats the uninterrupted run (samples and losses); LoRA and gradient
checkpointing; every teacher method trains 2 steps on-policy; DDP (default suite) and FSDP / ZeRO-3 (slow) on 2 CPU
processes equal one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from _spacy_helpers import method_extra
from _toy_method import ToyProjectorKD  # noqa: F401  (registers "toy-projector-test")
from test_robustness import LOGGED_UNIT, SMALL, cli, env, free_port, losses

from dwakd.config import ConfigError, check_on_policy, load_config
from dwakd.data.tokenization import IGNORE_INDEX
from dwakd.methods import get_method, method_names
from dwakd.on_policy import SAMPLES_FILE, OnPolicySampler, Sample, is_on_policy, sample_seed, sequence_log_likelihood
from dwakd.run import build_training

NO_DROPOUT = ("{arch: gpt2, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_positions: 128, "
              "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}")
SMALL_TEACHER = ("{arch: qwen2, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64, "
                 "max_positions: 128}")


def small_config(tiny_yaml, *overrides):
    base = [
        "method=toy-projector-test", f"student.tiny={NO_DROPOUT}", f"teacher.tiny={SMALL_TEACHER}",
        "data.max_length=48", "data.max_prompt_length=24", "data.max_train_examples=24", "data.eval=null",
        "training.per_device_train_batch_size=4", "training.logging_steps=1", "training.max_steps=2",
    ]
    return load_config(tiny_yaml, base + list(overrides))


def logged(run, key="loss"):
    return [e[key] for e in run.trainer.state.log_history if "loss" in e]


def make_eos_likely(student, probability_scale: float = 8.6) -> None:
    """Make an untrained GPT-2 end its samples early: ln_f outputs a constant pointing at the (tied) EOS embedding.

    The EOS logit becomes `probability_scale`, the others ~N(0, 1): about 5% EOS per token, so with 16 new tokens
    some samples end at EOS and some are cut by max_new_tokens (both branches of the label rule are exercised).
    """
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    eos = base.config.eos_token_id
    row = base.get_input_embeddings().weight[eos].detach()
    with torch.no_grad():
        base.transformer.ln_f.weight.zero_()
        base.transformer.ln_f.bias.copy_(probability_scale * row / row.pow(2).sum())


class Capture:
    """Wraps the trainer's compute_loss and the teacher's forward to record what each micro-batch trained on."""

    def __init__(self, run):
        self.batches: list[dict] = []
        self.num_items: list[float] = []
        self.teacher_inputs: list[torch.Tensor] = []
        trainer = run.trainer
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            self.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
            self.num_items.append(float(num_items_in_batch))
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = compute_loss
        run.model.teacher.register_forward_pre_hook(
            lambda module, args, kwargs: self.teacher_inputs.append(kwargs["input_ids"].clone()), with_kwargs=True)


# ---- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("on_policy.fraction=1.5", r"on_policy\.fraction: must be in \[0, 1\]"),
    ("on_policy.fraction=yes", r"on_policy\.fraction: expected a number"),
    ("on_policy.temperature=0", r"on_policy\.temperature: must be > 0"),
    ("on_policy.top_p=0", r"on_policy\.top_p: must be in \(0, 1\]"),
    ("on_policy.top_k=-1", r"on_policy\.top_k"),
    ("on_policy.max_new_tokens=0", r"on_policy\.max_new_tokens: must be at least 1"),
    ("on_policy.max_new_tokens=2.5", r"on_policy\.max_new_tokens: expected an integer"),
    ("on_policy.save_samples=maybe", r"on_policy\.save_samples"),
    ("on_policy.fractoin=0.5", r"unknown config key 'on_policy\.fractoin'.*'on_policy\.fraction'"),
])
def test_bad_on_policy_values_name_their_key(tiny_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tiny_yaml, override)


def test_on_policy_needs_a_live_teacher_and_a_budget(tiny_yaml):
    with pytest.raises(ConfigError, match=r"on_policy\.fraction: .*'sft' has none"):
        small_config(tiny_yaml, "method=sft", "on_policy.fraction=0.5")
    small_config(tiny_yaml, "method=sft", "on_policy.fraction=0")  # off: fine without a teacher
    with pytest.raises(ConfigError, match=r"on_policy\.max_new_tokens: 25 is more than .* = 24"):
        small_config(tiny_yaml, "on_policy={fraction: 0.5, max_new_tokens: 25}")
    config = small_config(tiny_yaml, "on_policy={fraction: 0.5, max_new_tokens: 24}")
    # a cached teacher (`teacher.cache`, a teacher-cache directory) cannot score new text
    config.teacher.cache = "runs/teacher-cache"
    with pytest.raises(ConfigError, match=r"on_policy\.fraction: a cached teacher \(teacher\.cache\)"):
        check_on_policy(config)
    config.on_policy.fraction = 0.0
    check_on_policy(config)


def test_on_policy_choice_is_a_seeded_function_of_step_and_micro_batch():
    draws = [is_on_policy(0.3, 7, step, k) for step in range(1000) for k in range(4)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [is_on_policy(0.3, 7, step, k) for step in range(1000) for k in range(4)]
    assert draws != [is_on_policy(0.3, 8, step, k) for step in range(1000) for k in range(4)]
    assert not any(is_on_policy(0.0, 7, s, 0) for s in range(100))
    assert all(is_on_policy(1.0, 7, s, 0) for s in range(100))
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 3, 3) != sample_seed(1, 2, 4)


# ---- the label rule and the scores ---------------------------------------------------------------------------------
def test_samples_are_dual_tokenized_like_data_with_eos_only_when_sampled(gpt2_tokenizer, qwen_tokenizer):
    from dwakd.config import OnPolicyConfig
    from dwakd.data import DistillationCollator

    collator = DistillationCollator(gpt2_tokenizer.pad_token_id, qwen_tokenizer.pad_token_id)
    sampler = OnPolicySampler(OnPolicyConfig(fraction=1.0), gpt2_tokenizer, qwen_tokenizer, collator,
                              max_prompt_length=16, max_length=40, seed=0)
    prompt = "### Instruction:\nName a colour.\n\n### Response:\n"
    samples = [Sample(3, prompt, " Blue, like the sky.", 6, True), Sample(5, prompt, " Green and", 3, False),
               Sample(8, prompt, "", 5, False)]
    examples = sampler.encode(samples)
    for example, sample in zip(examples, samples):
        assert example.index == sample.example_index and example.prompt == prompt
        for side, tokenizer in ((example.student, gpt2_tokenizer), (example.teacher, qwen_tokenizer)):
            labels = [t for t in side.labels if t != IGNORE_INDEX]
            response = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
            ends = [tokenizer.eos_token_id] if sample.stopped_at_eos or not response else []
            assert labels == response + ends
            text = prompt + sample.response
            for label, (start, end) in zip(side.labels, side.label_offsets):
                if label not in (IGNORE_INDEX, tokenizer.eos_token_id):
                    assert text[start:end] == tokenizer.decode([label])
    batch = sampler.collate(samples)
    assert batch["on_policy"] is True and batch["example_index"].tolist() == [3, 5, 8]
    assert [s["response"] for s in batch["samples"]] == [s.response for s in samples]


def test_sequence_log_likelihood_matches_a_float64_loop():
    from dwakd.interface import ModelView, TokenView

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)  # 11 head rows, vocab 9
    labels = torch.tensor([[-100, 3, 4, 8, -100], [-100, -100, 0, -100, -100]])
    view = TokenView(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), labels,
                     torch.zeros(2, 5, 2, dtype=torch.long), torch.zeros(2, 5, 2, dtype=torch.long))
    totals, counts = sequence_log_likelihood(ModelView(logits, None, None, 9), view)
    for b in range(2):
        expected = 0.0
        for i in range(5):
            if labels[b, i] >= 0:
                row = logits[b, i, :9].double()
                expected += float(row[labels[b, i]] - torch.logsumexp(row, 0))
        assert totals[b].item() == pytest.approx(expected, rel=1e-6)
    assert counts.tolist() == [3, 1]


# ---- training ----------------------------------------------------------------------------------------------------
def test_fraction_zero_is_the_off_policy_run(tiny_yaml, tmp_path):
    off = build_training(small_config(tiny_yaml, f"output_dir={tmp_path / 'off'}", "training.max_steps=3"),
                         show_progress=False)
    zero = build_training(small_config(tiny_yaml, f"output_dir={tmp_path / 'zero'}", "training.max_steps=3",
                                       "on_policy={fraction: 0, save_samples: true}"), show_progress=False)
    assert zero.trainer.on_policy is None
    for run in (off, zero):
        run.trainer.train()
    assert logged(zero) == logged(off) and len(logged(off)) == 3
    for key in ("ce", "mse", "grad_norm"):
        assert logged(zero, key) == logged(off, key)
    assert not (tmp_path / "zero" / SAMPLES_FILE).exists()


def test_fraction_one_trains_on_the_students_samples_only(tiny_yaml, tmp_path):
    """Every micro-batch is samples: both views decode to prompt + sample, offsets point into that text, labels are
    the sample (+ EOS when sampled), the teacher's forward saw its own tokenization of it; the step's token count
    is the count of these batches."""
    config = small_config(tiny_yaml, f"output_dir={tmp_path / 'on'}", "data.max_length=128",
                          "data.max_prompt_length=96", "training.per_device_train_batch_size=2",
                          "training.gradient_accumulation_steps=2",
                          "on_policy={fraction: 1, max_new_tokens: 16, save_samples: true}")
    run = build_training(config, show_progress=False)
    make_eos_likely(run.model.student)
    capture = Capture(run)
    run.trainer.train()
    s_tok, t_tok = run.student_tokenizer, run.teacher_tokenizer
    limit = config.data.max_prompt_length
    assert len(capture.batches) == 4 and all(b["on_policy"] for b in capture.batches)
    assert logged(run, "on_policy_fraction") == [1.0, 1.0]
    kinds, whole_texts = set(), 0
    for micro, (batch, teacher_ids) in enumerate(zip(capture.batches, capture.teacher_inputs)):
        # the teacher's forward ran on the batch's teacher view
        assert torch.equal(teacher_ids, batch["teacher_input_ids"])
        for row, sample in enumerate(batch["samples"]):
            prompt, response = sample["prompt"], sample["response"]
            assert prompt == batch["prompt_text"][row] and sample["example_index"] == batch["example_index"][row]
            text = prompt + response
            kinds.add(sample["stopped_at_eos"])
            decoded, prompt_cut = [], False
            for prefix, tokenizer in (("", s_tok), ("teacher_", t_tok)):
                mask = batch[f"{prefix}attention_mask"][row].bool()
                ids = batch[f"{prefix}input_ids"][row][mask].tolist()
                labels = batch[f"{prefix}labels"][row][mask].tolist()
                offsets = batch[f"{prefix}label_offsets"][row][mask].tolist()
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
                prompt_cut |= len(prompt_ids) > limit
                # this tokenizer's tokenization of prompt + sample, by the data's rules (nothing cut at this budget)
                assert ids == prompt_ids[:limit] + response_ids, (micro, row, prefix)
                # labels: exactly the sampled response, and EOS when the student sampled it
                expected = response_ids + ([tokenizer.eos_token_id] if sample["stopped_at_eos"] else [])
                assert [t for t in labels if t != IGNORE_INDEX] == expected, (micro, row, prefix)
                # the labels' offsets point at their text in prompt + sample
                for label, (start, end) in zip(labels, offsets):
                    if label not in (IGNORE_INDEX, tokenizer.eos_token_id):
                        assert len(prompt) <= start <= end <= len(text)
                        assert text[start:end] == tokenizer.decode([label])
                assert tokenizer.decode(response_ids) == response
                decoded.append(tokenizer.decode(ids))
            if not prompt_cut:  # both views decode to one and the same text: prompt + sample
                assert decoded == [text, text]
                whole_texts += 1
    assert kinds == {True, False}, "the test needs samples that stop at EOS and samples cut by max_new_tokens"
    assert whole_texts > 0
    # the token count of each step is the count of the step's two on-policy micro-batches
    for step in range(2):
        a, b = capture.batches[2 * step], capture.batches[2 * step + 1]
        expected = int(a["labels"].ne(IGNORE_INDEX).sum() + b["labels"].ne(IGNORE_INDEX).sum())
        assert capture.num_items[2 * step] == capture.num_items[2 * step + 1] == expected
    # the samples file holds every sample with its scores
    rows = [json.loads(line) for line in (tmp_path / "on" / SAMPLES_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 4 + [1] * 4
    assert [r["response"] for r in rows] == [s["response"] for b in capture.batches for s in b["samples"]]
    assert all(r["student_logprob"] < 0 and r["teacher_logprob"] < 0 and r["student_tokens"] > 0 for r in rows)
    logs = [e for e in run.trainer.state.log_history if "loss" in e]
    assert all(e["generate_seconds"] > 0 and 0 < e["generate_share"] < 1 for e in logs)


def test_token_count_is_exact_when_only_some_micro_batches_are_samples(tiny_yaml, tmp_path):
    config = small_config(tiny_yaml, f"output_dir={tmp_path / 'mix'}", "training.per_device_train_batch_size=1",
                          "training.gradient_accumulation_steps=4", "training.max_steps=3", "seed=3",
                          "on_policy={fraction: 0.5, max_new_tokens: 12}")
    run = build_training(config, show_progress=False)
    capture = Capture(run)
    run.trainer.train()
    flags = [bool(b.get("on_policy", False)) for b in capture.batches]
    assert flags == [is_on_policy(0.5, 3, step, k) for step in range(3) for k in range(4)]
    assert any(flags) and not all(flags), "seed 3 should mix data and sample micro-batches"
    for step in range(3):
        counts = [int(b["labels"].ne(IGNORE_INDEX).sum()) for b in capture.batches[4 * step : 4 * step + 4]]
        assert capture.num_items[4 * step : 4 * step + 4] == [sum(counts)] * 4
    realised = logged(run, "on_policy_fraction")
    assert realised == [sum(flags[4 * s : 4 * s + 4]) / 4 for s in range(3)]


def test_on_policy_accumulation_equals_big_batch(tiny_yaml, tmp_path):
    """Samples are seeded per example and step, so 2 micro-batches of 2 sample what 1 batch of 4 samples."""
    common = ["training.max_steps=1", "on_policy={fraction: 1, max_new_tokens: 12, save_samples: true}"]
    runs = [build_training(small_config(tiny_yaml, f"output_dir={tmp_path / name}", *common, *extra),
                           show_progress=False)
            for name, extra in (("big", []), ("small", ["training.per_device_train_batch_size=2",
                                                         "training.gradient_accumulation_steps=2"]))]
    grads = []
    for run in runs:
        captured: dict[str, torch.Tensor] = {}

        def keep(optimizer, args, kwargs, model=run.model, captured=captured):
            captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

        run.trainer.create_optimizer().register_step_pre_hook(keep)
        run.trainer.train()
        grads.append(captured)
    texts = [(tmp_path / name / SAMPLES_FILE).read_text().splitlines() for name in ("big", "small")]
    key = lambda line: (json.loads(line)["example_index"], json.loads(line)["response"])  # noqa: E731
    assert sorted(map(key, texts[0])) == sorted(map(key, texts[1])) and len(texts[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert logged(runs[0]) == pytest.approx(logged(runs[1]), rel=1e-4)


def test_resume_repeats_the_uninterrupted_on_policy_run(tiny_yaml, tmp_path):
    def config(name, *extra):
        return small_config(tiny_yaml, f"output_dir={tmp_path / name}", "training.max_steps=4",
                            "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
                            "seed=5", "on_policy={fraction: 0.5, max_new_tokens: 10, save_samples: true}", *extra)

    full = build_training(config("full"), show_progress=False)
    full.trainer.train()
    part = config("part", "training.save_strategy=steps", "training.save_steps=2")
    build_training(part, show_progress=False).trainer.train()
    resumed = build_training(part, show_progress=False)
    resumed.trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    realised = logged(full, "on_policy_fraction")
    assert 0 < sum(realised) < len(realised), "seed 5 should mix data and sample micro-batches"
    assert logged(resumed)[-2:] == pytest.approx(logged(full)[-2:], rel=1e-5)
    assert logged(resumed, "on_policy_fraction")[-2:] == realised[-2:]
    # the resumed run rewrote its steps' samples: the file equals the uninterrupted run's, line by line
    assert (tmp_path / "part" / SAMPLES_FILE).read_text() == (tmp_path / "full" / SAMPLES_FILE).read_text()


def test_lora_and_gradient_checkpointing_students_sample_and_train(tiny_yaml, tmp_path):
    lora = build_training(small_config(tiny_yaml, f"output_dir={tmp_path / 'lora'}",
                                       "student.lora={r: 4, alpha: 8, dropout: 0.0}",
                                       "training.gradient_checkpointing=true",  # LoRA's inputs need grads then
                                       "on_policy={fraction: 1, max_new_tokens: 8}"), show_progress=False)
    before = {n: p.detach().clone() for n, p in lora.model.student.named_parameters()}
    lora.trainer.train()
    assert all(math.isfinite(x) for x in logged(lora)) and logged(lora, "on_policy_fraction") == [1.0, 1.0]
    changed = {n for n, p in lora.model.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert lora.model.student.training
    assert any(getattr(m, "gradient_checkpointing", False) for m in lora.model.student.modules())

    runs = [build_training(small_config(tiny_yaml, f"output_dir={tmp_path / f'gc{flag}'}",
                                        f"training.gradient_checkpointing={flag}",
                                        "on_policy={fraction: 1, max_new_tokens: 8}"), show_progress=False)
            for flag in ("false", "true")]
    for run in runs:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            run.trainer.train()
        # transformers 5 calls activation_checkpointing_enable, and stops calling the old name in v6
        assert not [w for w in said if "only defines `gradient_checkpointing_enable`" in str(w.message)]
    assert logged(runs[1]) == pytest.approx(logged(runs[0]), rel=1e-5)
    assert any(getattr(m, "gradient_checkpointing", False) for m in runs[1].model.student.modules())
    assert runs[1].model.student.training


TEACHER_METHODS = [m for m in method_names() if not m.endswith("-test") and get_method(m)[0].needs_teacher]


@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_every_teacher_method_trains_on_policy(tiny_yaml, tmp_path, method, request):
    extra = method_extra(method, request)  # MTA's chunker: its units are found on the samples
    config = load_config(tiny_yaml, [f"method={method}", f"output_dir={tmp_path / method}", "training.max_steps=2",
                                     "data.max_length=64", "data.max_prompt_length=32", "data.eval=null",
                                     "training.logging_steps=1", "training.per_device_train_batch_size=2",
                                     "on_policy={fraction: 1, max_new_tokens: 12}", *extra])
    run = build_training(config, show_progress=False)
    run.trainer.train()
    losses_ = logged(run)
    assert len(losses_) == 2 and all(math.isfinite(x) for x in losses_)
    assert logged(run, "on_policy_fraction") == [1.0, 1.0]
    assert all(p.grad is None for p in run.model.teacher.parameters())


# ---- several processes -----------------------------------------------------------------------------------------------
def _samples_by_example(folder: Path) -> dict[tuple[int, int], str]:
    rows = [json.loads(line) for path in sorted(folder.glob("on_policy_samples*.jsonl"))
            for line in path.read_text().splitlines()]
    return {(r["step"], r["example_index"]): r["response"] for r in rows}


def _two_processes_equal_one(tiny_yaml, tmp_path, engine: list[str], keys=("loss", "ce", "t2s_ce", "s2t_kd")):
    common = [str(tiny_yaml), *SMALL, "training.max_steps=2", "data.max_train_examples=16", "method=dskd",
              "on_policy={fraction: 1, max_new_tokens: 8, save_samples: true}"]
    # the reference accumulates two micro-batches of 2, the two ranks' batches: one batch of 4 is not the same
    # computation (DSKD divides the teacher's states by the std of their own micro-batch) and its logged s2t_kd was
    # one logging unit off (0.006234 vs 0.006233); accumulated, the logs are identical
    single = tmp_path / "single"
    subprocess.run(cli(*common, f"output_dir={single}", "training.per_device_train_batch_size=2",
                       "training.gradient_accumulation_steps=2"),
                   env=env(), check=True, capture_output=True, timeout=600)
    multi = tmp_path / "multi"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "--master_addr=127.0.0.1", "-m", "dwakd.cli", "train", *common, f"output_dir={multi}",
         "training.per_device_train_batch_size=2", "training.ddp_backend=gloo", *engine],
        env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # the same samples for the same examples, whichever rank held them
    a, b = _samples_by_example(single), _samples_by_example(multi)
    assert a == b and len(a) == 8
    assert {p.name for p in multi.glob("on_policy_samples*.jsonl")} == {
        "on_policy_samples.rank0.jsonl", "on_policy_samples.rank1.jsonl"}
    for key in (*keys, "grad_norm", "on_policy_fraction"):
        x, y = losses(single, key), losses(multi, key)
        assert [s for s, _ in x] == [s for s, _ in y] == [1, 2]
        for (_, u), (_, v) in zip(x, y):
            # logged parts are rounded (one unit = 1.6e-4 of s2t_kd ≈ 0.006): see LOGGED_UNIT
            assert v == pytest.approx(u, rel=1e-4, abs=LOGGED_UNIT), key


def test_ddp_on_policy_equals_single_process(tiny_yaml, tmp_path):
    _two_processes_equal_one(tiny_yaml, tmp_path, [])


@pytest.mark.slow
def test_fsdp_on_policy_equals_single_process(tiny_yaml, tmp_path):
    _two_processes_equal_one(tiny_yaml, tmp_path, [
        "training.fsdp=true", "training.fsdp_config={transformer_layer_cls_to_wrap: [GPT2Block]}"])


@pytest.mark.slow
@pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed: pip install -e '.[distributed]'")
def test_zero3_on_policy_equals_single_process(tiny_yaml, tmp_path):
    zero3 = Path(__file__).resolve().parents[1] / "configs" / "distributed" / "zero3.json"
    _two_processes_equal_one(tiny_yaml, tmp_path, [f"training.deepspeed={zero3}"])
