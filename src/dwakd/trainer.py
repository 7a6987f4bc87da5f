"""DistillationTrainer: a `transformers.Trainer` whose model is the student plus the method's trainable modules.

The student and the method (projectors) live in one `DistillationModel`, so everything the Trainer does
for a model — DDP/FSDP/DeepSpeed wrapping, gradient clipping, mixed precision, checkpoints, resume — also
covers the projectors. The frozen teacher is held outside the module tree (not a parameter, not saved,
never wrapped for gradients) and runs under `torch.no_grad()`.

Checkpoints are Hugging Face-native: the student via `save_pretrained` (safetensors; a LoRA student saves
its adapter), the method's state in `distill_method.safetensors`, plus the student tokenizer.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

from dwakd.checkpoints import METHOD_WEIGHTS_NAME, load_method_state, load_student_weights
from dwakd.data.collator import META_KEYS
from dwakd.interface import DistillationInputs, ModelView, TokenView
from dwakd.methods.base import DistillationMethod
from dwakd.models import is_peft_model
from dwakd.on_policy import OnPolicySampler, SampleWriter, sequence_log_likelihood, student_for_generation
from dwakd.teacher_cache.view import CachedTeacher

logger = logging.getLogger(__name__)

# decimals of the logged loss parts and statistics (the JSON logs stay readable; tests comparing logs use it)
LOG_DECIMALS = 6
_VIEW_KEYS = ("input_ids", "attention_mask", "labels", "input_offsets", "label_offsets")
# Config fields of models whose logits are not just head(final hidden state) (soft-capping, scaling)
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class NonFiniteLossError(FloatingPointError):
    """A loss part became NaN/inf; the message names the part(s) and the step."""


class DistillationModel(nn.Module):
    """Student + method as one trainable module; forward returns {"loss", "parts", "stats"}."""

    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch (global token count, docs/methods.md §2.1)

    def __init__(self, student: nn.Module, method: DistillationMethod, teacher: nn.Module | None = None,
                 student_vocab_size: int | None = None, teacher_vocab_size: int | None = None,
                 row_logits: bool = True):
        super().__init__()
        self.student = student
        self.method = method
        object.__setattr__(self, "teacher", teacher)  # hidden from parameters(), state_dict() and DDP
        self.student_vocab_size = student_vocab_size or student.get_input_embeddings().weight.shape[0]
        self.teacher_vocab_size = teacher_vocab_size
        self.progress = 0.0  # fraction of training done; the trainer updates it every step
        self.step = 0  # optimizer steps done; the trainer updates it every step
        # Apply LM heads only at the rows a loss reads (prompt logits are never used); verified once per side.
        self.row_logits = row_logits
        self._head_checked: dict[str, bool | None] = {}
        if method.needs_teacher and teacher is None:
            raise ValueError(f"method {method.name!r} needs a teacher; set `teacher:` in the config")
        if method.needs_attentions:
            for side, model in (("student", student), ("teacher", teacher)):
                _use_eager_attention(side, model)

    @property
    def config(self):
        return self.student.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Checkpoint the student's layers (transformers 4.x's `Trainer` calls this name). Non-reentrant unless
        `training.gradient_checkpointing_kwargs` says otherwise, as transformers 5 defaults to: 4.x's reentrant
        default fails under DDP, which the Trainer runs with find_unused_parameters for a model like this one
        ("Expected to mark a variable ready only once")."""
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                   **kwargs)
        self._embeddings_require_grad()

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """The same under transformers 5's name, which its `Trainer` calls first (the old name is deprecated there
        and will not be called in v6)."""
        self.student.activation_checkpointing_enable(**kwargs)
        self._embeddings_require_grad()

    def _embeddings_require_grad(self) -> None:
        """Reentrant checkpointing (transformers 4.x's default, or asked for) gives no gradient to a segment whose
        inputs need none, so with frozen embeddings (a LoRA student) the adapters would silently never train; make
        the embedding output require grad, as PEFT's `prepare_model_for_kbit_training` does (transformers 5 does it
        itself)."""
        if getattr(self.student, "_require_grads_hook", None) is None:
            self.student.enable_input_require_grads()

    def forward(self, num_items_in_batch: torch.Tensor | int | None = None, sequence_scores: bool = False,
                **batch: torch.Tensor) -> dict:
        """The method's loss on one micro-batch; `sequence_scores=True` adds each row's summed label log-likelihood
        and label count under the student and the teacher (on-policy samples written for inspection)."""
        student_view = _token_view(batch, "")
        teacher_view = _token_view(batch, "teacher_") if "teacher_input_ids" in batch else None
        hidden = self.method.needs_hidden_states
        teacher_hidden = self.method.needs_teacher_hidden_states
        teacher_hidden = hidden if teacher_hidden is None else teacher_hidden
        student_model = self._run_side("student", self.student, student_view, hidden, self.student_vocab_size)
        teacher_model = None
        if self.method.needs_teacher:
            if teacher_view is None:
                raise ValueError("the batch has no teacher view; build the dataset with the teacher tokenizer")
            with torch.no_grad():
                if isinstance(self.teacher, CachedTeacher):  # teacher.cache: its outputs came with the batch
                    teacher_model = self.teacher.model_view(batch, teacher_view, self.teacher_vocab_size)
                else:
                    teacher_model = self._run_side("teacher", self.teacher, teacher_view, teacher_hidden,
                                                   self.teacher_vocab_size)
        if num_items_in_batch is None:
            num_items_in_batch = student_view.label_mask.sum()
        num_items = torch.as_tensor(num_items_in_batch, device=student_view.labels.device).clamp_min(1)
        result = self.method(DistillationInputs(student_view, teacher_view, student_model, teacher_model,
                                                num_items, self.progress, self.step))
        outputs = {"loss": result.loss, "parts": result.parts, "stats": result.stats}
        if sequence_scores:
            outputs["sequence_scores"] = {"student": sequence_log_likelihood(student_model, student_view)}
            if teacher_model is not None:
                outputs["sequence_scores"]["teacher"] = sequence_log_likelihood(teacher_model, teacher_view)
        return outputs

    def _run_side(self, side: str, model: nn.Module, view: TokenView, want_hidden: bool,
                  vocab_size: int | None) -> ModelView:
        """One model's forward as a ModelView: LM head deferred to the rows a loss reads when that is exact."""
        head = self._deferred_head(side, model)
        want_attentions = self.method.needs_attentions
        out = model(input_ids=view.input_ids, attention_mask=view.attention_mask,
                    output_hidden_states=want_hidden or head is not None, use_cache=False,
                    **({"logits_to_keep": _kept_positions(view.input_ids, self._head_checked.get(side))}
                       if head is not None else {}),
                    **({"output_attentions": True} if want_attentions else {}))
        vocab = vocab_size or out.logits.shape[-1]
        attentions = out.attentions if want_attentions else None
        if head is None:
            return ModelView(out.logits, out.hidden_states if want_hidden else None, model, vocab,
                             attentions=attentions)
        last_hidden = out.hidden_states[-1]
        if self._head_checked.get(side) is None:
            self._head_checked[side] = _head_reproduces_logits(head, last_hidden, out.logits)
            if not self._head_checked[side]:
                logger.warning("%s: applying the LM head to the final hidden states does not reproduce the model's "
                               "logits (logit scaling or soft-capping?); computing dense logits instead", side)
                return self._run_side(side, model, view, want_hidden, vocab_size)
        return ModelView(None, out.hidden_states if want_hidden else None, model, vocab, head=head,
                         last_hidden=last_hidden, attentions=attentions)

    def _deferred_head(self, side: str, model: nn.Module) -> nn.Module | None:
        """The LM head to apply per row, or None when this model must produce dense logits itself."""
        if not self.row_logits or self._head_checked.get(side) is False:
            return None
        if self._head_checked.get(side):  # verified on the first step: skip the per-step inspection
            return model.get_output_embeddings()
        base = model.get_base_model() if is_peft_model(model) else model
        config = getattr(base, "config", None)
        if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORM_KEYS):
            return None
        try:
            accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            accepts = False
        return model.get_output_embeddings() if accepts else None


def _token_view(batch: dict[str, torch.Tensor], prefix: str) -> TokenView:
    """One side's TokenView from collated keys (`teacher_` prefix for the teacher), with its text units if any."""
    unit_prefix = f"{prefix}units_"
    units = {key[len(unit_prefix):]: value for key, value in batch.items() if key.startswith(unit_prefix)}
    return TokenView(*(batch[prefix + k] for k in _VIEW_KEYS), units=units or None)


def _use_eager_attention(side: str, model: nn.Module | None) -> None:
    """Switch a model to eager attention, the implementation that returns attention probabilities."""
    if model is None:
        return
    base = model.get_base_model() if is_peft_model(model) else model
    if getattr(base.config, "_attn_implementation", "eager") == "eager":
        return
    logger.info("%s: switching to eager attention (the method reads attention probabilities)", side)
    base.set_attn_implementation("eager")


def _last_position(input_ids: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for the last position as a 1-D index (made on the model's device), not the int 1.

    With the int the model applies its head to the strided slice hidden[:, -1:], and `torch.matmul` does not fold
    that (batch, 1, hidden) slice into one product; for a frozen bf16 head on the CPU it then copies the head once
    per sequence: 1.1 s instead of 20 ms for a 151,936 × 512 head at batch 4, and batch × the head's bytes of
    memory (a 7B teacher's head: 1.1 GB per copy). The index gathers a contiguous (batch, 1, hidden) first.
    """
    length = input_ids.shape[1]
    return torch.arange(length - 1, length, device=input_ids.device)


def _kept_positions(input_ids: torch.Tensor, head_checked: bool | None) -> torch.Tensor:
    """`logits_to_keep` of a deferred-head forward: the last position until the head has been checked against the
    model's own logits there (`_head_reproduces_logits`, first step), then none — nothing reads the model's logits
    after that, and at the tiny recipe's 151,646-token teacher head the unused last-position product was ~1 % of a
    `dskd` step on a CPU."""
    if head_checked:
        return torch.empty(0, dtype=torch.long, device=input_ids.device)
    return _last_position(input_ids)


def _head_reproduces_logits(head: nn.Module, last_hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether head(final hidden state) equals the model's own logits at the last position (checked once)."""
    with torch.no_grad():
        ours = head(last_hidden[:, -1:].contiguous()).float()  # contiguous: see `_last_position`
        theirs = logits[:, -1:].float()
        if ours.shape != theirs.shape:
            return False
        scale = 1.0 + theirs.abs().max().item()
        return bool(torch.allclose(ours, theirs, rtol=1e-2, atol=1e-3 * scale))


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts.

    Under torch.distributed the flag is OR-reduced across ranks every step, so all ranks save the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        logger.warning("interrupt received: saving a checkpoint after this step (press Ctrl-C again to abort)")
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if requested else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class LengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length grouping (`get_length_grouped_indices`: shuffled megabatches of 50 optimizer steps'
    examples, each sorted by length, so a batch pads little), its batches shuffled, with the order a function of
    (seed, epoch) only: every rank draws the same order and a resumed run the same batches (the Trainer calls
    `set_epoch`)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # the batches in random order: transformers' order walks each megabatch from its longest batch to its
        # shortest, a 50-step length cycle that training follows (on the demo's data its teacher's loss after 120
        # steps was 4-5.7 in that order, 2.7 with the batches shuffled, 1.4 without grouping)
        return iter([i for k in torch.randperm(len(batches), generator=generator).tolist() for i in batches[k]])


class DistillationTrainer(Trainer):
    """`transformers.Trainer` for a `DistillationModel`: projector learning rate, named loss parts, HF checkpoints."""

    def __init__(self, model: DistillationModel, *args: Any, projector_lr: float = 1e-3,
                 on_nonfinite: str = "stop", on_policy: OnPolicySampler | None = None,
                 group_by_length: bool = False, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        self.projector_lr = projector_lr
        self.group_by_length = group_by_length
        self.on_nonfinite = on_nonfinite
        self.on_policy = on_policy  # None: off-policy (no micro-batch is ever replaced)
        self._generate_seconds = 0.0  # spent sampling since the last log
        self.on_policy_totals = {"generate_seconds": 0.0, "micro_batches": 0, "on_policy_micro_batches": 0}
        self._log_clock: float | None = None  # perf_counter at the last log (or the first step)
        self._sample_writer: SampleWriter | None = None
        if model.teacher is not None:
            model.teacher.to(self.args.device)
        self._part_sums: dict[str, float] = defaultdict(float)
        self._stat_sums: dict[str, float] = defaultdict(float)
        self._micro_batches = 0
        self._last_logged_step: int | None = None  # set when training (re)starts: a resume starts at N
        self.skipped_micro_batches = 0
        self.interrupt = SaveOnInterrupt()
        self.add_callback(self.interrupt)

    # ---- batching ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        """`data.group_by_length`: a `LengthGroupedSampler` over the dual-tokenized lengths (transformers' own
        option cannot read them: it looks for an `input_ids` field)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(*([train_dataset] if train_dataset is not None else []))
        step_examples = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(dataset.lengths(), step_examples, seed=self.args.seed)

    # ---- on-policy batches ------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches, the on-policy ones replaced by the student's samples *before* the Trainer
        counts the step's label tokens, so `num_items_in_batch` is exact for the batches actually trained on."""
        if self.on_policy is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._log_clock is None:
            self._log_clock = time.perf_counter()
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        step = self.state.global_step
        chosen = [k for k in range(len(batches)) if self.on_policy.decide(step, k)]
        if chosen:
            started = time.perf_counter()
            with student_for_generation(self) as student:
                self.on_policy.replace(student, batches, chosen, step)
            seconds = time.perf_counter() - started
            self._generate_seconds += seconds
            self.on_policy_totals["generate_seconds"] += seconds
        self.on_policy_totals["micro_batches"] += len(batches)
        self.on_policy_totals["on_policy_micro_batches"] += len(chosen)
        return super().get_batch_samples(iter(batches), len(batches), device)

    # ---- loss -------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        core = self.accelerator.unwrap_model(model)
        if model.training and self._last_logged_step is None:
            self._last_logged_step = self.state.global_step
        if self.state.max_steps:
            core.progress = min(1.0, self.state.global_step / self.state.max_steps)
        core.step = self.state.global_step
        meta = {key: inputs.pop(key) for key in META_KEYS if key in inputs}
        on_policy = bool(meta.get("on_policy", False))
        scores = on_policy and model.training and self.on_policy is not None and self.on_policy.config.save_samples
        extra = {"sequence_scores": True} if scores else {}
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, **extra)
        loss = outputs["loss"]
        if self.on_policy is not None and model.training:
            outputs["stats"] = {**outputs["stats"], "on_policy_fraction": float(on_policy)}  # realised share
        if scores:
            self._write_samples(meta["samples"], outputs["sequence_scores"])
        if not torch.isfinite(loss.detach()).all():
            loss = self._handle_nonfinite(loss, outputs)
        elif model.training:
            self._accumulate(outputs)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the loss is a global-token sum
        return (loss, outputs) if return_outputs else loss

    def _write_samples(self, samples: list[dict], scores: dict) -> None:
        if self._sample_writer is None:
            self._sample_writer = SampleWriter(self.args.output_dir, self.accelerator.process_index,
                                               self.accelerator.num_processes)
        self._sample_writer.write(self.state.global_step, samples, scores)

    def _handle_nonfinite(self, loss: torch.Tensor, outputs: dict) -> torch.Tensor:
        bad = [name for name, value in {**outputs["parts"], "loss": loss}.items()
               if not math.isfinite(float(torch.as_tensor(value).detach().float().sum()))]
        message = (f"non-finite loss at step {self.state.global_step} (epoch {self.state.epoch or 0:.2f}): "
                   f"part(s) {', '.join(bad)} became NaN/inf")
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(message + "; stopping (set method.on_nonfinite=skip to skip such batches)")
        logger.warning("%s; skipping this micro-batch", message)
        self.skipped_micro_batches += 1
        # A zero loss attached to the graph: no gradient flows from this micro-batch.
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)

    def _accumulate(self, outputs: dict) -> None:
        for name, value in outputs["parts"].items():
            self._part_sums[name] += float(torch.as_tensor(value).detach().float())
        for name, value in outputs["stats"].items():
            self._stat_sums[name] += float(torch.as_tensor(value).detach().float())
        self._micro_batches += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the named loss parts (mean per optimizer step) and stats (mean per micro-batch) to training logs.

        Under several processes, parts are summed over ranks (each rank holds its share of the global-token sum)
        and stats averaged over all ranks' micro-batches, so the logged values equal a single-process run's.
        """
        if "loss" in logs:
            parts, stats, micro = self._reduce_logged()
            if micro:
                steps = max(1, self.state.global_step - (self._last_logged_step or 0))
                logs.update({name: round(total / steps, LOG_DECIMALS) for name, total in parts.items()})
                logs.update({name: round(total / micro, LOG_DECIMALS) for name, total in stats.items()})
            if self.on_policy is not None:  # this process's time sampling, and its share of the wall time
                now = time.perf_counter()
                elapsed = now - (self._log_clock or now)
                logs["generate_seconds"] = round(self._generate_seconds, 3)
                logs["generate_share"] = round(self._generate_seconds / elapsed, 4) if elapsed > 0 else 0.0
                self._generate_seconds, self._log_clock = 0.0, now
            self._part_sums.clear()
            self._stat_sums.clear()
            self._micro_batches = 0
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)

    def _reduce_logged(self) -> tuple[dict[str, float], dict[str, float], float]:
        parts, stats, micro = dict(self._part_sums), dict(self._stat_sums), float(self._micro_batches)
        if self.accelerator.num_processes <= 1:
            return parts, stats, micro
        names = sorted(parts), sorted(stats)
        values = [parts[n] for n in names[0]] + [stats[n] for n in names[1]] + [micro]
        total = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.args.device), "sum")
        total = total.tolist()
        parts = dict(zip(names[0], total[: len(names[0])]))
        stats = dict(zip(names[1], total[len(names[0]) : -1]))
        return parts, stats, total[-1]

    # ---- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW groups: student (decay / no decay) at the learning rate, method projectors at `projector_lr`,
        and any group the method declares (`DistillationMethod.param_groups`) with its own settings."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        method = getattr(self.accelerator.unwrap_model(opt_model), "method", None)
        declared = method.param_groups() if method is not None else {}
        # group kind: "" student, "method" projectors, "method:<prefix>" a group the method declared
        groups: dict[tuple[str, bool], list[nn.Parameter]] = defaultdict(list)
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            kind = ""
            if name.startswith("method."):
                local = name[len("method."):]
                kind = next((f"method:{p}" for p in declared if local.startswith(p)), "method")
            groups[(kind, name in decay)].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        param_groups = []
        for (kind, has_decay), params in sorted(groups.items()):
            group = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if kind:
                group["lr"] = self.projector_lr
            if kind.startswith("method:"):
                group.update(declared[kind[len("method:"):]])
            param_groups.append(group)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- checkpoints ------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Student with `save_pretrained` (safetensors), method state, tokenizer, training args."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        core: DistillationModel = self.accelerator.unwrap_model(self.model)
        student_state = method_state = None
        if state_dict is not None:  # gathered by DeepSpeed/FSDP: split it between student and method
            student_state = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
            method_state = {k[len("method."):]: v for k, v in state_dict.items() if k.startswith("method.")}
            student_state = _alias_shared(student_state, core.student)
        core.student.save_pretrained(output_dir, state_dict=student_state, safe_serialization=True)
        method_state = method_state if method_state is not None else core.method.state_to_save()
        if method_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in method_state.items()},
                      os.path.join(output_dir, METHOD_WEIGHTS_NAME), metadata={"method": core.method.name})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore student (full weights or LoRA adapter) and method state from a dwakd checkpoint."""
        core: DistillationModel = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(core.student, resume_from_checkpoint)
        load_method_state(core.method, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # the engine reloads its own (ZeRO-partitioned) checkpoint
            return super()._load_best_model()
        logger.info("loading best model from %s", self.state.best_model_checkpoint)
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _alias_shared(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Point names of one shared parameter (tied embeddings) at one tensor again, so it is saved once.

    Gathered state dicts (DeepSpeed ZeRO-1/2 clones every tensor) lose the aliasing that `save_pretrained`
    uses to drop tied copies; parameter identity in the live module survives ZeRO-3 partitioning.
    """
    first: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state
