"""Benchmark: our `dskd` loss against the DSKD authors' own criterion on the same models, projectors and batch.

The authors' criterion is `DualSpaceKDWithCMA` of songmzhang/DSKD
(`code/criterions/dual_space_kd_with_cross_model_attention.py`, a subclass of `various_divergence.VariousDivergence`
and `cross_entropy_loss.CrossEntropyLoss`). It is not part of this repository: it is loaded at run time from a
checkout given with `--dskd-repo` — only those three modules, into a synthetic package, without running
`code/criterions/__init__.py` (which imports the other criteria and their dependencies). Its forward runs the
student and the teacher itself and all-reduces every logged value, so a one-process gloo group is created when
none exists.

Both sides get the same student and teacher (the same module objects), the same batch (our collated keys; the
authors' `input_ids`, `attention_mask`, `teacher_qwen_input_ids`, `teacher_qwen_attention_mask`, `label`,
`teacher_qwen_label` are the same tensors: both formats shift labels once, `label[b, i]` is the token after
position i, −100 at prompt and padding), and the authors' `projectors` are copies of our method's t2s, s2t and
query Linear layers (docs/methods.md §4.1). Settings: τ = `--temperature` on both (the authors' kd_temperature),
the authors' teacher_temperature = 1, kd_rate 0.5, forward KL, no label smoothing; batch_denom = N, the number of
valid student positions (what DSKD's training loop passes with one process and no accumulation:
global label count / (accumulation steps · ranks); ours divides by the same N, docs/methods.md §2.1).

1. Agreement (the tiny recipe's models, fp32). *Agreement case*: every position of both sides is a valid response
   position and no sequence is padded (so the reference's `.std()` over the whole padded tensor equals ours over the
   valid positions), heads without padding rows (the tiny models have exactly their tokenizers' rows), one
   temperature. Loss, parts and the gradients of every student and projector parameter are compared (largest
   |difference| / largest |value| per tensor). The t2s projector's bias is aimed at one token k and k is the gold
   label at every other student position, so DSKD's correctness mask keeps about half the positions (with random
   projectors it keeps none and t2s_kd is 0 on both sides). Run on the models as built (random init: near-uniform
   distributions, s2t_kd ≈ 1e-5 nats per position) and on `peaked` copies (heads ×10 student, ×20 teacher) where
   every term is O(1). *Ordinary batch*: prompts, responses and right padding of different lengths on both sides;
   the results differ by the documented std choice (docs/methods.md §4.5), shown by rerunning ours with the
   reference's std (the whole padded tensor, patched in this process only), which then agrees again.
2. Time and peak memory of one loss forward + backward, rounds interleaved (the order alternates every round),
   median and best-of-N, ratios authors / ours (time) and ours / authors (memory), ours with `head_fusion` dense
   and fused (docs/methods.md §4.4). What is timed, per variant, from the same batch:
   - authors: `criterion(distiller, input_data, output_data, {}, N)` (student forward with dense logits, teacher
     forward under no_grad with dense logits, the loss, its logging all-reduces) and `loss.backward()`;
   - ours: `DistillationModel(**batch)` as `dwakd train` builds it (student forward with the head deferred to the
     label rows, teacher forward under no_grad likewise, the method's loss) and `loss.backward()`.
   Gradients are set to None before each pass (outside the timing), so gradient buffers count on both sides. Peak
   memory: on CPU a separate profiled pass per variant (`dwakd.evaluation.memory.peak_bytes`: live tensor bytes
   above those live before the pass), on CUDA `torch.cuda.max_memory_allocated` in every timed pass.
   Shapes:
   - `tiny`: `configs/tiny-cpu.yaml`'s models (random-init 2-layer GPT-2 student, d 64, GPT-2's 50,257-token
     vocabulary; 2-layer Qwen2 teacher, d 96, Qwen's 151,646 tokens), eval mode (no dropout); batch 4, per sequence
     and side 128 prompt positions then 128 response positions;
   - `paper`: batch 4, 512 positions of which the last 256 are response positions, student hidden 768 and a tied
     50,257-row table/head, teacher hidden 2048 and a tied 151,936-row table/head (151,646 real tokens). No
     transformer: stub modules whose forward returns fixed random hidden states (the student's a parameter with
     gradient) and `lm_head(hidden)` as logits (at every position for the authors; ours asks for the last one,
     `logits_to_keep`, and applies the head at the label rows itself); random tables (student N(0, 0.02²), teacher
     N(0, 0.08²)). The losses differ here by the std over the prompt
     positions and by the head's 290 padding rows (docs/methods.md §4.5).

    PYTHONPATH=src python benchmarks/dskd_authors.py --dskd-repo /path/to/DSKD --quick       # small shapes: seconds
    PYTHONPATH=src python benchmarks/dskd_authors.py --dskd-repo /path/to/DSKD               # tiny + paper, CPU
    PYTHONPATH=src python benchmarks/dskd_authors.py --dskd-repo /path/to/DSKD --shapes tiny --rounds 7
    PYTHONPATH=src python benchmarks/dskd_authors.py --dskd-repo /path/to/DSKD --device cuda --paper-rounds 5
    PYTHONPATH=src python benchmarks/dskd_authors.py --dskd-repo /path/to/DSKD --precision bf16   # bf16, both sides

`--precision bf16` times both sides under bf16 autocast with the frozen teacher in bf16 (the authors' scripts train
in bf16; our paper recipes load the teacher so); the agreement checks (item 1) stay fp32.

`/path/to/DSKD` is a checkout of https://github.com/songmzhang/DSKD (measured at commit 077337a) holding
`code/criterions/`. Writes benchmarks/results/dskd_authors_<device>.json (`_quick` with --quick, or --out).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs without PYTHONPATH=src: the dwakd imports below need it first
sys.path.insert(0, str(ROOT / "benchmarks"))  # kd_loss (the paper shapes), also when loaded by a test

from kd_loss import Shapes as PaperShapes  # noqa: E402  (the loss benchmark's paper shapes)

from dwakd.evaluation.memory import peak_bytes  # noqa: E402  (after the sys.path line above)
from dwakd.methods import MethodContext, build_method  # noqa: E402
from dwakd.modules import cross_attention  # noqa: E402
from dwakd.modules.divergences import compute_dtype  # noqa: E402
from dwakd.trainer import DistillationModel  # noqa: E402

AUTHORS_MODULES = ("cross_entropy_loss", "various_divergence", "dual_space_kd_with_cross_model_attention")
AUTHORS_PACKAGE = "_dskd_authors_criterions"
TEACHER_TYPE = "qwen"  # the authors' batch keys are teacher_<type>_*; the name is only a key here
OBJECTIVES = {"fkl": "forward_kl", "rkl": "reverse_kl", "sfkl": "skewed_forward_kl", "srkl": "skewed_reverse_kl",
              "js": "js_divergence", "akl": "adaptive_kl"}
# our logged part -> the authors' logged value (theirs: each divided by batch_denom, like ours by N)
PARTS = {"ce": "nll_loss", "t2s_ce": "t2s_ce_loss", "t2s_kd": "t2s_kd_loss", "s2t_kd": "s2t_kd_loss", "kd": "kd_loss"}


# ---- the authors' criterion ----------------------------------------------------------------------------------------
def load_authors_criterion(repo: str | Path) -> type:
    """`DualSpaceKDWithCMA` from a songmzhang/DSKD checkout: its three modules only, never its `__init__.py`."""
    repo = Path(repo).expanduser().resolve()
    candidates = (repo / "code" / "criterions", repo / "criterions", repo)
    folder = next((c for c in candidates if all((c / f"{m}.py").is_file() for m in AUTHORS_MODULES)), None)
    if folder is None:
        wanted = ", ".join(f"{m}.py" for m in AUTHORS_MODULES)
        raise FileNotFoundError(
            f"{repo} is not a checkout of songmzhang/DSKD: no code/criterions/ with {wanted} there "
            "(git clone https://github.com/songmzhang/DSKD, then pass its folder)")
    loaded = sys.modules.get(f"{AUTHORS_PACKAGE}.{AUTHORS_MODULES[-1]}")
    if loaded is not None and Path(loaded.__file__).parent == folder:
        return loaded.DualSpaceKDWithCMA
    package = types.ModuleType(AUTHORS_PACKAGE)
    package.__path__ = []  # nothing else of the folder can be imported through it; its __init__.py never runs
    sys.modules[AUTHORS_PACKAGE] = package
    for name in AUTHORS_MODULES:  # in dependency order: each one's `from .x import X` finds x already loaded
        spec = importlib.util.spec_from_file_location(f"{AUTHORS_PACKAGE}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
    return sys.modules[f"{AUTHORS_PACKAGE}.{AUTHORS_MODULES[-1]}"].DualSpaceKDWithCMA


def repo_commit(repo: str | Path) -> str | None:
    """The checkout's commit, when it is a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != Path(repo).expanduser().resolve():
        return None  # not a git work tree of its own (an archive, or a folder inside another repository)
    return lines[1]


def ensure_process_group() -> bool:
    """A one-process gloo group for the criterion's logging all-reduces; True if this call created it."""
    if dist.is_initialized():
        return False
    init_file = Path(tempfile.mkdtemp(prefix="dskd_authors_pg_")) / "init"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    return True


def authors_args(temperature: float, kd_rate: float, objective: str, skew_lambda: float = 0.1,
                 akl_alpha: float = 0.5) -> SimpleNamespace:
    """The fields of the authors' `args` that their three criterion classes read."""
    return SimpleNamespace(
        kd_rate=kd_rate, kd_temperature=temperature, teacher_temperature=1.0, kd_objective=OBJECTIVES[objective],
        label_smoothing=0.0, only_save_projector=False, model_type="gpt2", report_logits=False,
        skew_lambda=skew_lambda, adaptive_kl_alpha=akl_alpha,
    )


def authors_distiller(student: nn.Module, teacher: nn.Module, ours: DistillationModel, args: SimpleNamespace):
    """The distiller the criterion reads: both models, a copy of our projectors, the teacher type and args."""
    projectors = nn.ModuleDict({name: copy.deepcopy(getattr(ours.method.projectors, name))
                                for name in ("query", "s2t", "t2s")})
    return SimpleNamespace(student_model=student, teacher_model=teacher, projectors=projectors,
                           teacher_model_type=TEACHER_TYPE, args=args)


def authors_batch(batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(input_data, output_data) in the authors' keys, the same tensors as our batch."""
    t = f"teacher_{TEACHER_TYPE}_"
    input_data = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  t + "input_ids": batch["teacher_input_ids"], t + "attention_mask": batch["teacher_attention_mask"]}
    output_data = {"label": batch["labels"], t + "label": batch["teacher_labels"]}
    return input_data, output_data


# ---- models ---------------------------------------------------------------------------------------------------------
@dataclass
class TinyShapes:
    batch: int = 4
    prompt: int = 128  # positions per sequence without a label
    response: int = 128  # positions per sequence with a label


TINY_QUICK = TinyShapes(batch=2, prompt=16, response=24)
PAPER_QUICK = PaperShapes(batch=2, length=64, response=24, student_hidden=32, student_vocab=3000,
                          student_head_rows=3000, teacher_hidden=48, teacher_vocab=9000, teacher_head_rows=9024)


class StubLM(nn.Module):
    """A Hugging Face-like causal LM without blocks: fixed hidden states, logits = lm_head(hidden).

    `layout` "gpt2" keeps the table at `transformer.wte` (the student), "qwen" at `model.embed_tokens` (the
    teacher) — where the authors' criterion looks for them. Table and head are one tied weight.
    """

    def __init__(self, layout: str, rows: int, hidden: int, batch: int, length: int, std: float,
                 generator: torch.Generator, trainable_hidden: bool):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden, vocab_size=rows, model_type=f"stub-{layout}")
        table = nn.Embedding(rows, hidden)
        with torch.no_grad():
            table.weight.copy_(torch.randn(rows, hidden, generator=generator) * std)
        if layout == "gpt2":
            self.transformer = nn.Module()
            self.transformer.wte = table
        else:
            self.model = nn.Module()
            self.model.embed_tokens = table
        self.lm_head = nn.Linear(hidden, rows, bias=False)
        self.lm_head.weight = table.weight
        self.hidden = nn.Parameter(torch.randn(batch, length, hidden, generator=generator),
                                   requires_grad=trainable_hidden)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte if hasattr(self, "transformer") else self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False,
                use_cache=None, logits_to_keep=0):
        hidden = self.hidden[:, : input_ids.shape[1]]
        if isinstance(logits_to_keep, torch.Tensor):  # positions, as transformers' `slice_logits_to_keep` reads them
            kept = hidden[:, logits_to_keep]
        else:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(kept)
        return SimpleNamespace(logits=logits, hidden_states=(hidden,) if output_hidden_states else None)


def tiny_models(config_path: str, device: torch.device) -> tuple[nn.Module, nn.Module, int, int, int, int]:
    """(student, teacher, V_s, V_t, student pad id, teacher pad id) of a tiny recipe, built as `dwakd train` does."""
    from dwakd.config import load_config
    from dwakd.models import load_side_model, load_side_tokenizer, prepare_student, prepare_teacher

    config = load_config(config_path, ["method=dskd"])
    s_tok = load_side_tokenizer(config.student, "student")
    t_tok = load_side_tokenizer(config.teacher, "teacher")
    student = prepare_student(load_side_model(config.student, s_tok, "student"), config.student)
    teacher = prepare_teacher(load_side_model(config.teacher, t_tok, "teacher"), config.teacher)
    student.eval()  # no dropout: both sides must see the same function
    return student.to(device), teacher.to(device), len(s_tok), len(t_tok), s_tok.pad_token_id, t_tok.pad_token_id


def paper_models(shapes: PaperShapes, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    n, length = shapes.batch, shapes.length
    student = StubLM("gpt2", shapes.student_head_rows, shapes.student_hidden, n, length, 0.02, g, True)
    teacher = StubLM("qwen", shapes.teacher_head_rows, shapes.teacher_hidden, n, length, 0.08, g, False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student.to(device), teacher.eval().to(device)


def build_ours(student: nn.Module, teacher: nn.Module, v_s: int, v_t: int, head_fusion: str, args,
               seed: int = 0) -> DistillationModel:
    """Our `dskd` as `dwakd train` wraps it (projectors initialised after `seed`, identical across variants)."""
    context = MethodContext(student.config, teacher.config, None, None, student, teacher)
    options = {"head_fusion": head_fusion, "kd_temperature": args.temperature, "kd_rate": args.kd_rate,
               "kd_objective": args.kd_objective}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = build_method("dskd", context, options)
    return DistillationModel(student, method.to(student.get_input_embeddings().weight.device), teacher, v_s, v_t)


# ---- batches --------------------------------------------------------------------------------------------------------
def side_batch(g: torch.Generator, prompts: list[int], responses: list[int], vocab: int, pad_id: int,
               prefix: str = "", gold: int | None = None) -> dict[str, torch.Tensor]:
    """One side, right-padded: sequence b has prompts[b] positions without a label, then responses[b] positions
    whose label is the next token of the stream (labels shifted once); −100 at prompt and padding positions.
    `gold`: the stream token after every other response position is `gold` (its label there)."""
    length = max(p + r for p, r in zip(prompts, responses, strict=True))
    batch = len(prompts)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    offsets = torch.full((batch, length, 2), -1, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        stream = torch.randint(0, vocab, (p + r + 1,), generator=g)
        if gold is not None:
            stream[p + 1 :: 2] = gold  # labels of response positions p, p + 2, ...
        ids[b, : p + r] = stream[: p + r]
        attention[b, : p + r] = 1
        labels[b, p : p + r] = stream[p + 1 : p + r + 1]
        offsets[b, : p + r, 0] = torch.arange(p + r)
        offsets[b, : p + r, 1] = torch.arange(1, p + r + 1)
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention, f"{prefix}labels": labels,
            f"{prefix}input_offsets": offsets, f"{prefix}label_offsets": offsets.clone()}


def make_batch(student_side: tuple[list[int], list[int]], teacher_side: tuple[list[int], list[int]],
               v_s: int, v_t: int, pads: tuple[int, int], device: torch.device, seed: int = 0,
               gold: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = side_batch(g, *student_side, v_s, pads[0], gold=gold)
    batch.update(side_batch(g, *teacher_side, v_t, pads[1], prefix="teacher_"))
    return {k: v.to(device) for k, v in batch.items()}


def aim_t2s(ours: DistillationModel, student: nn.Module, v_s: int) -> int:
    """Make argmax(t2s_logits) one token k at every position: the t2s bias becomes 10·W_s[k]/|W_s[k]|², which the
    head maps to a logit 10 at k and less elsewhere (k is the row of largest norm), far above what the rest of t2s
    adds. Returns k, to be put as the gold label at some positions."""
    head = student.get_output_embeddings().weight.detach()[:v_s]
    k = int(head.norm(dim=-1).argmax())
    with torch.no_grad():
        ours.method.projectors.t2s.bias.copy_(10 * head[k] / head[k].pow(2).sum())
    return k


# ---- one pass -------------------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One variant: how to run a loss forward + backward, and which parameters it trains."""

    name: str
    run: Callable[[], tuple[torch.Tensor, dict[str, float]]]  # -> (loss, logged parts already / N)
    params: dict[str, nn.Parameter]


def ours_side(name: str, ours: DistillationModel, batch: dict[str, torch.Tensor]) -> Side:
    def run():
        out = ours(**batch)
        return out["loss"], {k: float(v) for k, v in out["parts"].items()}

    params = {f"student.{k}": p for k, p in ours.student.named_parameters() if p.requires_grad}
    params.update({f"projectors.{k}": p for k, p in ours.method.projectors.named_parameters()})
    return Side(name, run, params)


def authors_side(criterion: nn.Module, distiller, batch: dict[str, torch.Tensor]) -> Side:
    input_data, output_data = authors_batch(batch)
    denom = batch["labels"].ne(-100).sum().float()  # N: the training loop's loss_denom with one process, no accum.

    def run():
        logging_output: dict[str, list[float]] = {}
        loss, logging_output = criterion(distiller, input_data, output_data, logging_output, denom)
        return loss, {ours: logging_output[theirs][-1] for ours, theirs in PARTS.items()}

    params = {f"student.{k}": p for k, p in distiller.student_model.named_parameters() if p.requires_grad}
    params.update({f"projectors.{k}": p for k, p in distiller.projectors.named_parameters()})
    return Side("authors", run, params)


def zero_grads(side: Side) -> None:
    for p in side.params.values():
        p.grad = None


# the frozen teacher's weights per --precision: bf16 as the paper configs load it (`teacher.dtype: bfloat16`) and as
# the authors' bf16 scripts run it
TEACHER_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """The timed passes' precision: fp32, or bf16 mixed precision (`torch.autocast` over the student's fp32 master
    weights, as `dwakd train` runs with `bf16: true`; the authors' scripts train in bf16 too), both sides alike."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_backward(side: Side, device: torch.device | None = None, precision: str = "fp32"
                     ) -> tuple[float, dict[str, float]]:
    with autocast(device or torch.device("cpu"), precision):
        loss, parts = side.run()
    loss.backward()
    return float(loss.detach()), parts


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (the scale of a gradient, not of its smallest entries)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def compare(sides: list[Side], reference: str = "authors") -> dict:
    """One pass of each side; loss, parts and gradients of each side against the reference side."""
    values, parts, grads = {}, {}, {}
    for side in sides:
        zero_grads(side)
        values[side.name], parts[side.name] = forward_backward(side)
        grads[side.name] = {k: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                            for k, p in side.params.items()}
    ref = next(s for s in sides if s.name == reference)
    result = {"loss": values, "parts": parts}
    for side in sides:
        if side.name == reference:
            continue
        errors = {k: relative_error(grads[side.name][k], grads[reference][k]) for k in ref.params}
        student = {k: v for k, v in errors.items() if k.startswith("student.")}
        worst = max(student, key=student.get)
        result[side.name] = {
            "loss_relative": abs(values[side.name] - values[reference]) / abs(values[reference]),
            "parts_relative": {k: abs(parts[side.name][k] - parts[reference][k]) / max(abs(parts[reference][k]), 1e-30)
                               for k in PARTS},
            "grad_student_max_relative": student[worst], "grad_student_worst": worst,
            "grad_projectors_relative": {k: v for k, v in errors.items() if k.startswith("projectors.")},
        }
    return result


def reference_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's normalisation: `.std()` over the whole padded tensor (prompt and padding included)."""
    return x.detach().to(compute_dtype(x)).std()


def agreement_block(name: str, criterion, ours: dict[str, DistillationModel], distiller, batch) -> dict:
    """Loss, parts and gradients of our variants against the authors' on one batch (and printed)."""
    sides = [authors_side(criterion, distiller, batch)] + [ours_side(k, m, batch) for k, m in ours.items()]
    block = compare(sides)
    block["valid_student"] = int(batch["labels"].ne(-100).sum())
    block["valid_teacher"] = int(batch["teacher_labels"].ne(-100).sum())
    with torch.no_grad():
        block["t2s_acc"] = float(ours["ours-dense"](**batch)["stats"]["t2s_acc"])
    if name.startswith("ordinary_batch"):  # ours with the reference's std: the difference is the std choice
        original = cross_attention.masked_global_std
        cross_attention.masked_global_std = reference_std
        try:
            patched = compare([sides[0], ours_side("ours-dense-reference-std", ours["ours-dense"], batch)])
        finally:
            cross_attention.masked_global_std = original
        block["ours-dense-reference-std"] = patched["ours-dense-reference-std"]
        block["loss"]["ours-dense-reference-std"] = patched["loss"]["ours-dense-reference-std"]
        block["parts"]["ours-dense-reference-std"] = patched["parts"]["ours-dense-reference-std"]
    for variant in [k for k in block if k.startswith("ours-")]:
        entry = block[variant]
        print(f"  {name:22s} {variant:24s} loss {block['loss'][variant]:.7f} (authors {block['loss']['authors']:.7f}):"
              f" rel {entry['loss_relative']:.1e}, parts ≤ {max(entry['parts_relative'].values()):.1e}, grads "
              f"student ≤ {entry['grad_student_max_relative']:.1e}, projectors ≤ "
              f"{max(entry['grad_projectors_relative'].values()):.1e}", flush=True)
    return block


def agreement(args, device: torch.device) -> dict:
    """Agreement cases and the ordinary batch on the tiny recipe's models (module docstring, item 1)."""
    student, teacher, v_s, v_t, pad_s, pad_t = tiny_models(args.config, device)
    criterion = args.criterion_class(authors_args(args.temperature, args.kd_rate, args.kd_objective))
    # every position valid and no padding (student 2 × 32, teacher 2 × 40 positions: the lengths differ by side);
    # prompts, responses and right padding of different lengths on both sides
    cases = {"agreement_case": (([0, 0], [32, 32]), ([0, 0], [40, 40])),
             "ordinary_batch": (([8, 12], [24, 14]), ([10, 9], [28, 17]))}
    result: dict = {"models": "tiny recipe (configs/tiny-cpu.yaml), fp32, eval mode",
                    "positions": {k: {"student (prompt, response)": s, "teacher (prompt, response)": t}
                                  for k, (s, t) in cases.items()}}
    # as built (random init: near-uniform distributions, every KL ≈ 1e-5 nats per position), and peaked: the heads
    # scaled (student ×10, teacher ×20) so that every term is O(1) and no agreement rests on near-zero values
    for models in ("as_built", "peaked"):
        if models == "peaked":
            student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
            with torch.no_grad():
                student.get_output_embeddings().weight.mul_(10)  # GPT-2: tied to the input table
                teacher.get_output_embeddings().weight.mul_(20)
        ours = {f"ours-{f}": build_ours(student, teacher, v_s, v_t, f, args) for f in ("dense", "fused")}
        gold = aim_t2s(ours["ours-dense"], student, v_s)
        ours["ours-fused"].method.projectors.load_state_dict(ours["ours-dense"].method.projectors.state_dict())
        distiller = authors_distiller(student, teacher, ours["ours-dense"], criterion.args)
        for name, (s_side, t_side) in cases.items():
            batch = make_batch(s_side, t_side, v_s, v_t, (pad_s, pad_t), device, seed=1, gold=gold)
            key = name if models == "as_built" else f"{name}_peaked"
            result[key] = agreement_block(key, criterion, ours, distiller, batch)
            result[key]["gold_token"] = gold
    return result


# ---- timing ---------------------------------------------------------------------------------------------------------
def timed_pass(side: Side, device: torch.device, memory: bool, precision: str = "fp32") -> dict:
    """One forward + backward: seconds (timed runs) or peak bytes (the profiled run on CPU), and the loss."""
    zero_grads(side)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if memory and device.type == "cpu":
        (value, _), peak = peak_bytes(lambda: forward_backward(side, device, precision), device)
        return {"value": value, "peak_bytes": peak}
    start = time.perf_counter()
    if device.type == "cuda":
        (value, _), peak = peak_bytes(lambda: forward_backward(side, device, precision), device)
    else:
        (value, _), peak = forward_backward(side, device, precision), None
    return {"value": value, "seconds": time.perf_counter() - start, "peak_bytes": peak}


def bench(sides: list[Side], rounds: int, device: torch.device, label: str, precision: str = "fp32") -> dict:
    """Memory pass per variant (CPU; on CUDA an untimed warm-up), then interleaved timed rounds; every pass in
    `precision` (`autocast`)."""
    result: dict = {"variants": {s.name: {"samples_s": [], "peak_bytes": []} for s in sides}}
    for side in sides:  # also the warm-up of each variant
        out = timed_pass(side, device, memory=True, precision=precision)
        entry = result["variants"][side.name]
        entry["loss"] = out["value"]
        if device.type == "cpu":
            entry["peak_bytes"].append(out["peak_bytes"])
        print(f"  {label:6s} {side.name:10s} loss {out['value']:.6f}"
              + (f"  peak {out['peak_bytes'] / 2**20:9.1f} MiB" if device.type == "cpu" else ""), flush=True)
        del out
        gc.collect()
    for r in range(rounds):
        for side in sides if r % 2 == 0 else list(reversed(sides)):
            out = timed_pass(side, device, memory=False, precision=precision)
            entry = result["variants"][side.name]
            entry["samples_s"].append(out["seconds"])
            if out["peak_bytes"] is not None:
                entry["peak_bytes"].append(out["peak_bytes"])
            print(f"  {label:6s} {side.name:10s} round {r}: {out['seconds']:7.2f} s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    authors = result["variants"]["authors"]
    for name, entry in result["variants"].items():
        entry["median_s"] = statistics.median(entry["samples_s"])
        entry["best_s"] = min(entry["samples_s"])
        entry["peak_mib"] = max(entry["peak_bytes"]) / 2**20
        if name == "authors":
            continue
        paired = [a / o for a, o in zip(authors["samples_s"], entry["samples_s"], strict=True)]
        entry["vs_authors"] = {
            "time_ratio_median": authors["median_s"] / entry["median_s"],  # authors / ours: > 1 means ours faster
            "time_ratio_best": authors["best_s"] / entry["best_s"],
            "time_ratio_paired_median": statistics.median(paired),
            "time_ratios_paired": paired,
            "memory_ratio": max(entry["peak_bytes"]) / max(authors["peak_bytes"]),  # ours / authors
            "loss_relative": abs(entry["loss"] - authors["loss"]) / abs(authors["loss"]),
        }
    return result


def bench_tiny(args, device: torch.device) -> dict:
    shapes = TINY_QUICK if args.quick else TinyShapes()
    student, teacher, v_s, v_t, pad_s, pad_t = tiny_models(args.config, device)
    teacher = teacher.to(TEACHER_DTYPE[args.precision])
    criterion = args.criterion_class(authors_args(args.temperature, args.kd_rate, args.kd_objective))
    side = ([shapes.prompt] * shapes.batch, [shapes.response] * shapes.batch)
    batch = make_batch(side, side, v_s, v_t, (pad_s, pad_t), device, seed=2)
    ours = {f"ours-{f}": build_ours(student, teacher, v_s, v_t, f, args) for f in ("dense", "fused")}
    distiller = authors_distiller(student, teacher, ours["ours-dense"], criterion.args)
    sides = [authors_side(criterion, distiller, batch)] + [ours_side(k, m, batch) for k, m in ours.items()]
    result = bench(sides, args.rounds, device, "tiny", args.precision)
    result["shapes"] = {**vars(shapes), "student_vocab": v_s, "teacher_vocab": v_t,
                        "student_hidden": student.config.n_embd, "teacher_hidden": teacher.config.hidden_size}
    return result


def bench_paper(args, device: torch.device) -> dict:
    shapes = PAPER_QUICK if args.quick else PaperShapes()
    student, teacher = paper_models(shapes, device)
    teacher = teacher.to(TEACHER_DTYPE[args.precision])
    criterion = args.criterion_class(authors_args(args.temperature, args.kd_rate, args.kd_objective))
    side = ([shapes.length - shapes.response] * shapes.batch, [shapes.response] * shapes.batch)
    batch = make_batch(side, side, shapes.student_vocab, shapes.teacher_vocab, (0, 0), device, seed=3)
    ours = {f"ours-{f}": build_ours(student, teacher, shapes.student_vocab, shapes.teacher_vocab, f, args)
            for f in ("dense", "fused")}
    distiller = authors_distiller(student, teacher, ours["ours-dense"], criterion.args)
    sides = [authors_side(criterion, distiller, batch)] + [ours_side(k, m, batch) for k, m in ours.items()]
    result = bench(sides, args.paper_rounds, device, "paper", args.precision)
    result["shapes"] = vars(shapes)
    return result


def machine_info(device: torch.device) -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["memory_total_gib"] = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
                                             / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dskd-repo", required=True, help="a checkout of songmzhang/DSKD (holding code/criterions/)")
    parser.add_argument("--shapes", default="tiny,paper",
                        help="comma list from tiny, paper; none: the agreement checks only")
    parser.add_argument("--dskd-commit", default=None,
                        help="the checkout's commit, recorded when it is not a git work tree (an archive)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"), help="the tiny recipe")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds at the tiny shape")
    parser.add_argument("--paper-rounds", type=int, default=3, help="timed rounds at the paper shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=float, default=2.0, help="τ: our kd_temperature, the authors' too")
    parser.add_argument("--kd-rate", type=float, default=0.5)
    parser.add_argument("--kd-objective", choices=sorted(OBJECTIVES), default="fkl")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="of the timed passes, both sides (bf16: autocast); the agreement checks stay fp32")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s and s != "none"]
    if set(shapes) - {"tiny", "paper"}:
        parser.error(f"--shapes: unknown {sorted(set(shapes) - {'tiny', 'paper'})}")
    try:
        args.criterion_class = load_authors_criterion(args.dskd_repo)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_path = Path(args.out or ROOT / "benchmarks" / "results" /
                    f"dskd_authors_{device.type}{'_quick' if args.quick else ''}.json")
    created = ensure_process_group()
    report: dict = {
        "command": " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "dskd_repo": str(Path(args.dskd_repo).resolve()),
        "dskd_commit": repo_commit(args.dskd_repo) or args.dskd_commit,
        "machine": machine_info(device),
        "settings": {"temperature": args.temperature, "authors_teacher_temperature": 1.0, "kd_rate": args.kd_rate,
                     "kd_objective": args.kd_objective, "batch_denom": "N (valid student positions)",
                     "quick": args.quick, "rounds": args.rounds, "paper_rounds": args.paper_rounds,
                     "precision": args.precision},
    }
    try:
        print("agreement (tiny recipe models, fp32)", flush=True)
        report["agreement"] = agreement(args, device)
        report["shapes"] = {}
        for name in shapes:
            print(f"{name} shape", flush=True)
            report["shapes"][name] = (bench_tiny if name == "tiny" else bench_paper)(args, device)
            gc.collect()
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1))  # partial results survive an interrupted run
    finally:
        if created:
            dist.destroy_process_group()
    report["machine"]["load_average_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"\n{'shape':6s} {'variant':10s} {'median s':>9s} {'best s':>8s} {'peak MiB':>9s} "
          f"{'authors/ours time (median, best)':>33s} {'ours/authors mem':>17s}")
    for name, block in report["shapes"].items():
        for variant, entry in block["variants"].items():
            ratios = entry.get("vs_authors")
            extra = (f"{ratios['time_ratio_median']:15.2f}x {ratios['time_ratio_best']:6.2f}x"
                     f"{ratios['memory_ratio']:18.3f}x" if ratios else "")
            print(f"{name:6s} {variant:10s} {entry['median_s']:9.2f} {entry['best_s']:8.2f} "
                  f"{entry['peak_mib']:9.1f} {extra}")
    print(f"load average {report['machine']['load_average_start']} -> {report['machine']['load_average_end']}; "
          f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
