"""`dwakd train`: wire a RunConfig into models, data, a method and the DistillationTrainer (torchtune-style recipe)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainingArguments, set_seed

from dwakd.checkpoints import checkpoint_problem, last_complete_checkpoint
from dwakd.config import (
    ConfigError,
    RunConfig,
    check_method_options,
    check_on_policy,
    config_to_dict,
    training_arguments,
)
from dwakd.cpu_memory import keep_freed_cpu_memory
from dwakd.data import DistillationCollator, DualTokenizedDataset, encode_records, load_records, split_records
from dwakd.data.records import LoadReport
from dwakd.methods import MethodContext, build_method, build_options, get_method
from dwakd.models import (
    configure_attention_backends,
    load_side_model,
    load_side_tokenizer,
    prepare_student,
    prepare_teacher,
)
from dwakd.on_policy import OnPolicySampler
from dwakd.ops.autocast import emulated_on_cpu
from dwakd.teacher_cache.reader import TeacherCache
from dwakd.tokenizers import cache_dir
from dwakd.trainer import DistillationModel, DistillationTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What `build_training` assembled, for `dwakd train`, `dwakd bench` and tests."""

    config: RunConfig
    trainer: DistillationTrainer
    model: DistillationModel
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    train_dataset: DualTokenizedDataset
    eval_dataset: DualTokenizedDataset | None


def model_max_positions(model) -> int | None:
    """Longest sequence the model's position embeddings support (None when unbounded/unknown)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _check_lengths(config: RunConfig, model, role: str) -> None:
    limit = model_max_positions(model)
    if limit is not None and config.data.max_length > limit:
        raise ConfigError(f"data.max_length={config.data.max_length} exceeds the {role}'s "
                          f"{limit} positions; lower data.max_length")


@contextmanager
def whole_models(args: TrainingArguments) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, build the models whole instead of partitioned by `deepspeed.zero.Init`.

    TrainingArguments with a ZeRO-3 config make transformers build every model inside `zero.Init`. The
    teacher must stay whole (it runs outside the engine, on every rank), and methods read both models' weights
    when they are built; the engine partitions the student and the projectors itself when training starts.
    """
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is None or not hf_config.is_zero3():
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(hf_config)


def load_datasets(config: RunConfig, student_tokenizer, teacher_tokenizer, show_progress: bool = True,
                  annotator=None):
    """Records -> (train, eval) dual-tokenized datasets; every record validated first; with an `annotator`
    (a method's `text_annotator`), each record's text units are stored per token on both sides."""
    d = config.data
    report = LoadReport()
    records = load_records(d.train, split="train", skip_invalid=d.skip_invalid, report=report)
    eval_records = None
    if d.eval:
        eval_records = load_records(d.eval, split="validation", skip_invalid=d.skip_invalid, report=report)
    elif d.eval_size:
        parts = split_records(records, {"eval": d.eval_size, "train": -1}, seed=d.split_seed)
        records, eval_records = parts["train"], parts["eval"]
    if report.skipped:
        logger.warning("data: %s", report.summary())
    if d.max_train_examples:
        records = records[: d.max_train_examples]
    kwargs = dict(max_prompt_length=d.max_prompt_length, max_length=d.max_length, show_progress=show_progress,
                  annotator=annotator)
    train_examples, stats = encode_records(records, student_tokenizer, teacher_tokenizer, **kwargs)
    logger.info("train data: %s", stats.summary())
    train = DualTokenizedDataset(train_examples, stats)
    evaluation = None
    if eval_records:
        eval_examples, eval_stats = encode_records(eval_records, student_tokenizer, teacher_tokenizer, **kwargs)
        evaluation = DualTokenizedDataset(eval_examples, eval_stats)
    return train, evaluation


def build_training(config: RunConfig, show_progress: bool = True) -> TrainingRun:
    """Load everything a run needs, cheapest checks first, so a bad config or data file fails in seconds.

    Order: training arguments and method options (ConfigErrors naming the key), tokenizers (pad/EOS), data
    (every row validated and tokenized), then the models (vocab vs embedding rows, max_length vs positions), then
    the method.
    """
    set_seed(config.seed)
    args = training_arguments(config)
    configure_attention_backends(torch.cuda.is_available() and not args.use_cpu)
    on_cpu = args.use_cpu or not torch.cuda.is_available()
    if on_cpu:
        keep_freed_cpu_memory()  # DWAKD_CPU_MALLOC=keep: CPU steps reuse freed memory instead of faulting it in
        warn_emulated_precision(config, args)
    check_method_options(config.method)
    check_on_policy(config)
    method_cls, _ = get_method(config.method.name)
    # a method's text annotator (MTA's chunker) is built here: a missing optional dependency fails before any data
    annotator = method_cls.text_annotator(build_options(config.method.name, config.method.options))
    needs_teacher = method_cls.needs_teacher
    if needs_teacher and config.teacher is None:
        raise ConfigError(f"method {config.method.name!r} needs a teacher: add a `teacher:` section")
    _check_local_paths(config, needs_teacher)
    student_tokenizer = _as_config_error(load_side_tokenizer, config.student, "student")
    teacher_tokenizer = _as_config_error(load_side_tokenizer, config.teacher, "teacher") if needs_teacher else None
    # teacher.cache: the teacher's outputs come from a `dwakd teacher-cache` directory, checked before anything loads
    cache = (_as_config_error(TeacherCache.for_run, config, teacher_tokenizer, args)
             if needs_teacher and config.teacher.cache else None)
    train, evaluation = load_datasets(config, student_tokenizer, teacher_tokenizer, show_progress, annotator)
    if len(train) == 0:
        raise ConfigError("no training examples left after tokenization; check data.max_length and the data")
    if cache is not None:
        for name, dataset in (("training", train), ("evaluation", evaluation)):
            if dataset is not None:
                _as_config_error(cache.check_examples, [e.teacher for e in dataset.examples], name)
    with whole_models(args):
        student = _as_config_error(load_side_model, config.student, student_tokenizer, "student")
        _check_lengths(config, student, "student")
        student = prepare_student(student, config.student)
        teacher = None
        if cache is not None:  # embedding table, LM head and config only: the blocks are never built
            teacher = _as_config_error(cache.teacher_module)
            _check_lengths(config, teacher, "teacher")
        elif needs_teacher:
            # on a private RNG: merging `teacher.adapter` builds PEFT layers whose random init would otherwise shift
            # the projectors' initialisation, so an adapter teacher, the same teacher merged and a teacher cache
            # (which loads no blocks) all start the student's side from the same draw
            with torch.random.fork_rng(devices=[]):
                teacher = _as_config_error(load_side_model, config.teacher, teacher_tokenizer, "teacher")
                _check_lengths(config, teacher, "teacher")
                teacher = prepare_teacher(teacher, config.teacher)
        if on_cpu:
            warn_emulated_precision(config, args, {"student": student, "teacher": teacher})
        context = MethodContext(student.config, teacher.config if teacher is not None else None, student_tokenizer,
                                teacher_tokenizer, student, teacher, str(cache_dir()))
        method = build_method(config.method.name, context, config.method.options)
    if cache is not None:
        _as_config_error(teacher.configure_for, method)
    model = DistillationModel(student, method, teacher, len(student_tokenizer),
                              len(teacher_tokenizer) if teacher_tokenizer is not None else None)
    collator = DistillationCollator(student_tokenizer.pad_token_id,
                                    teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None)
    if cache is not None:
        collator = cache.collator(collator)
    on_policy = None
    if config.on_policy.enabled:
        on_policy = OnPolicySampler(config.on_policy, student_tokenizer, teacher_tokenizer, collator,
                                    max_prompt_length=config.data.max_prompt_length,
                                    max_length=config.data.max_length, seed=args.seed, annotator=annotator)
    trainer = DistillationTrainer(model, args=args, train_dataset=train, eval_dataset=evaluation,
                                  data_collator=collator, processing_class=student_tokenizer,
                                  projector_lr=config.method.projector_lr, on_nonfinite=config.method.on_nonfinite,
                                  on_policy=on_policy, group_by_length=config.data.group_by_length)
    return TrainingRun(config, trainer, model, student_tokenizer, teacher_tokenizer, train, evaluation)


def warn_emulated_precision(config: RunConfig, args: TrainingArguments,
                            models: dict[str, torch.nn.Module | None] | None = None) -> list[str]:
    """Warn (and return the warnings) when a CPU run computes in a 16-bit dtype this CPU only emulates.

    Without `models`: `training.bf16` (autocast), checked before anything loads. With them: each model's parameter
    dtype, named by its config key (`dtype: auto` takes the checkpoint's, often bf16). An AVX2-only CPU has no
    bf16/fp16 matmul instructions, and a step there in 16 bits is several times slower than in fp32 (9x for
    `dskd` on the tiny recipe; `dwakd.ops.autocast.emulated_on_cpu`); a warning, not an error, as the numerics may
    be the point.
    """
    found = []
    if models is None:
        if args.bf16 and emulated_on_cpu(torch.bfloat16):
            found.append(("training.bf16", "true", torch.bfloat16, "set training.bf16=false"))
    else:
        for role, model in models.items():
            param = next(model.parameters(), None) if model is not None else None
            if param is not None and emulated_on_cpu(param.dtype):
                spec = getattr(config, role)
                found.append((f"{role}.dtype", spec.dtype, param.dtype, f"set {role}.dtype=float32"))
    messages = [f"{key}: {value} computes in {dtype} on this CPU, which has no native {dtype} matmul instructions "
                f"(AVX512-BF16/FP16 or AMX): they are emulated, several to ~80x slower than float32; {fix} unless the "
                "16-bit numerics are the point" for key, value, dtype, fix in found]
    for message in messages:
        logger.warning("%s", message)
    return messages


def _check_local_paths(config: RunConfig, needs_teacher: bool) -> None:
    """A model path that is not on disk and cannot be a hub name (`namespace/name`) fails here, naming its key.

    Otherwise the hub client reports it much later as a malformed repository id.
    """
    sides = [("student", config.student)] + ([("teacher", config.teacher)] if needs_teacher else [])
    for role, spec in sides:
        for key in ("name_or_path", "tokenizer", "adapter"):
            value = getattr(spec, key)
            if not isinstance(value, str) or value.startswith("builtin:") or os.path.exists(value):
                continue
            parts = value.split("/")
            if value.startswith((".", "/", "~")) or len(parts) > 2 or value.endswith("/"):
                raise ConfigError(f"{role}.{key}: {value!r} is not a folder here and cannot be a hub name "
                                  "(namespace/name); make it first (the recipe's comments say how) or fix the path")


def _as_config_error(function, *args):
    """Model/tokenizer problems (missing EOS, vocab larger than the embedding, ...) as ConfigErrors."""
    try:
        return function(*args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def resolve_resume(config: RunConfig, output_dir: str) -> str | None:
    """`training.resume_from_checkpoint`: a path, or true/'last' for the newest *complete* checkpoint."""
    value = config.training.get("resume_from_checkpoint")
    # DeepSpeed keeps optimizer state in the checkpoint's global_step*/ (written before trainer_state.json)
    need_optimizer = not config.training.get("save_only_model", False) and not config.training.get("deepspeed")
    if value in (None, False, ""):
        return None
    if value in (True, "last", "auto"):
        last = last_complete_checkpoint(output_dir, need_optimizer)
        if last is None:
            logger.warning("no complete checkpoint in %s to resume from; starting fresh", output_dir)
        return str(last) if last else None
    problem = checkpoint_problem(value, need_optimizer) if os.path.isdir(value) else "not a directory"
    if problem:
        raise ConfigError(f"training.resume_from_checkpoint: {value}: {problem}")
    return str(value)


def train(config: RunConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run training; writes the final student, method state, config and logs to `training.output_dir`."""
    run = build_training(config, show_progress)
    out = Path(run.trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dwakd_config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    result = run.trainer.train(resume_from_checkpoint=resolve_resume(config, str(out)))
    if run.trainer.interrupt.stopped_at is not None:
        step = run.trainer.interrupt.stopped_at
        logger.warning("interrupted: checkpoint-%d saved in %s; continue with training.resume_from_checkpoint=last",
                       step, out)
        _leave_together(run.trainer)
        return {"output_dir": str(out), "global_step": step, "train_loss": result.training_loss,
                "log_history": run.trainer.state.log_history, "interrupted": True}
    run.trainer.save_model(str(out))
    if run.trainer.args.should_save:
        run.trainer.state.save_to_json(str(out / "trainer_state.json"))
        summary = {"method": config.method.name, "global_step": result.global_step,
                   "train_loss": result.training_loss, "metrics": result.metrics,
                   "train_examples": len(run.train_dataset),
                   "tokenization": run.train_dataset.stats.summary() if run.train_dataset.stats else "",
                   "skipped_micro_batches": run.trainer.skipped_micro_batches}
        if run.trainer.on_policy is not None:  # this process's sampling time and realised on-policy share
            totals = dict(run.trainer.on_policy_totals)
            totals["generate_seconds"] = round(totals["generate_seconds"], 3)
            totals["train_seconds"] = round(result.metrics.get("train_runtime", 0.0), 3)
            summary["on_policy"] = totals
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if config.student.lora is not None:
            merged = run.model.student.merge_and_unload() if hasattr(run.model.student, "merge_and_unload") else None
            if merged is not None:
                merged.save_pretrained(str(out / "merged"), safe_serialization=True)
                run.student_tokenizer.save_pretrained(str(out / "merged"))
    _leave_together(run.trainer)
    return {"output_dir": str(out), "global_step": result.global_step, "train_loss": result.training_loss,
            "log_history": run.trainer.state.log_history}


def _leave_together(trainer: DistillationTrainer) -> None:
    """Several processes: wait until every rank is done (rank 0 writes files), then let gloo's threads finish.

    The last collective of a ZeRO-3 run (the all-gather of the final save, kept alive by the barrier that
    follows it) is released by a gloo worker thread, which needs the GIL to free its Python tensors. If the
    main thread is already finalizing the interpreter by then, that thread is killed inside a C++ destructor
    and the process aborts ("terminate called without an active exception": 3 of 74 two-process ZeRO-3 runs on
    2 cores, 1 of 45 with the barrier alone, 0 of 70 with the sleep). Sleeping gives up the GIL so it can finish.
    """
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
        time.sleep(0.2)
