"""Benchmark: the dual-space KD terms of `dskd` / `dwakd` at paper shapes, fused head + divergence vs dense logits.

Random hidden states and heads, no models (so it runs on CPU): batch 4, sequence 512 with 256 response tokens
per sequence on both sides (P = Q = 1024 rows), student hidden 768 with GPT-2's 50,257-token head (trained,
gradient to the head), teacher hidden 2048 with a Qwen-sized 151,936-row head of which 151,646 are real tokens
(frozen). Per KD configuration, the loss the methods build from these pieces (everything after the cross-model
attention; DTW is not part of it):

    (1 − k)·CE(z_s, y) + k·(t2s_ce + Σ_i scale_i·D(t2s → z_s)_i + Σ_j u_j·KL(z_t → s2t)_j), all / num_items

- `dskd`: scale_i = [argmax t2s_i = y_i], u_j = 1 (also `dwakd-dtw`, `dwakd-bdtw`, `dwakd` with weights off);
- `dwakd`: scale_i = w_i = Ĥ_s(i)·g_i and u_j = 1 − Ĥ_t(j), rescaled per sequence (also `dwakd-ew`: the same
  KD terms, DTW off);
- `dwakd-nogate`: w_i = Ĥ_s(i), u_j as dwakd.

Variants: `fused` (two `dwakd.ops.fused_kd.fused_head_kd` calls: the student space with the trained student head,
recomputed in backward; the teacher space with the frozen teacher head, hidden-state gradients formed in forward),
`dense` (the methods' `head_fusion: dense` path: `F.linear` logits at the valid rows, `F.cross_entropy`, the chunked
`modules.divergences.divergence`, `modules.token_weights`), and `autograd` (the op's plain reference,
`head_kd_reference`, everything by autograd; opt-in: it keeps every intermediate, ≈ 1.4× the dense peak at the
`--quick` shapes, and is slower still).

Measured per (configuration, variant):
- seconds of forward + backward (`loss.backward()`), rounds interleaved (the order of variants alternates from
  round to round) so background load hits all alike; every sample, the median and the best-of-N are kept;
- peak memory: on CPU from a separate, profiled run (`dwakd.evaluation.memory.peak_bytes`: the CPU allocator's
  running total of live tensor bytes, from the profiler's allocation events) — exact tensor accounting, no
  RSS; on CUDA `torch.cuda.max_memory_allocated` in every timed run. Counted above what was live before the
  call (inputs and heads), so it includes the gradient buffers the call creates (e.g. the 154 MB student-head
  gradient, identical in all variants);
- agreement of the loss value and of every gradient between the variants (the fused op's correctness at scale).

    PYTHONPATH=src python benchmarks/kd_loss.py                          # CPU, paper shapes, dskd/dwakd/nogate
    PYTHONPATH=src python benchmarks/kd_loss.py --quick                  # small shapes: a smoke run in seconds
    PYTHONPATH=src python benchmarks/kd_loss.py --device cuda --autocast bf16 --rounds 5 --variants fused,dense,autograd

Writes benchmarks/results/kd_loss_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs without PYTHONPATH=src: the dwakd imports below need it first

from dwakd.evaluation.memory import peak_bytes  # noqa: E402  (after the sys.path line above)
from dwakd.modules.divergences import compute_dtype, divergence  # noqa: E402
from dwakd.modules.rows import valid_rows  # noqa: E402
from dwakd.modules.token_weights import (  # noqa: E402
    peak_probability,
    rescale_per_sequence,
    scatter_valid,
    student_token_weights,
    teacher_token_weights,
)
from dwakd.ops.fused_kd import fused_head_kd, head_kd_reference  # noqa: E402

TERMS = {  # name: (token weights on, gate on)
    "dskd": (False, False),
    "dwakd": (True, True),
    "dwakd-nogate": (True, False),
}
VARIANTS = ("fused", "dense", "autograd")


@dataclass
class Shapes:
    batch: int = 4
    length: int = 512
    response: int = 256
    student_hidden: int = 768
    student_vocab: int = 50257
    student_head_rows: int = 50257
    teacher_hidden: int = 2048
    teacher_vocab: int = 151646
    teacher_head_rows: int = 151936


QUICK = Shapes(batch=2, length=64, response=24, student_hidden=32, student_vocab=3000, student_head_rows=3008,
               teacher_hidden=48, teacher_vocab=9000, teacher_head_rows=9024)


@dataclass
class Inputs:
    """Hidden states at the valid rows, heads, labels and masks (random)."""

    student_hidden: torch.Tensor  # (P, d_s) h_s, grad
    student_head: torch.Tensor  # (rows_s, d_s) W_s, grad (trained, tied to the embeddings in GPT-2)
    t2s_hidden: torch.Tensor  # (P, d_s) cross-model-attention output in student space, grad
    teacher_hidden: torch.Tensor  # (Q, d_t) h_t, no grad
    teacher_head: torch.Tensor  # (rows_t, d_t) W_t, frozen
    s2t_hidden: torch.Tensor  # (Q, d_t) student information in teacher space, grad
    labels: torch.Tensor  # (P,) gold student tokens
    student_mask: torch.Tensor  # (batch, length) bool
    teacher_mask: torch.Tensor
    num_items: float
    student_vocab: int
    teacher_vocab: int

    def trainable(self) -> dict[str, torch.Tensor]:
        return {"student_hidden": self.student_hidden, "student_head": self.student_head,
                "t2s_hidden": self.t2s_hidden, "s2t_hidden": self.s2t_hidden}


def make_inputs(shapes: Shapes, device: torch.device, seed: int = 0) -> Inputs:
    """Random hidden states N(0, 1) and heads: student N(0, 0.02²) (logit std ≈ 0.55, an unsure student), teacher
    N(0, 0.08²) (logit std ≈ 3.6: a peaked teacher, entropy ≈ 5 of 11.9 nats, so 1 − Ĥ_t is not ≈ 0)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device)

    mask = torch.zeros(shapes.batch, shapes.length, dtype=torch.bool, device=device)
    mask[:, shapes.length - shapes.response:] = True  # prompt first, then the response
    rows = shapes.batch * shapes.response
    student_head = randn(shapes.student_head_rows, shapes.student_hidden, scale=0.02).requires_grad_()
    t2s_hidden = randn(rows, shapes.student_hidden).requires_grad_()
    labels = torch.randint(0, shapes.student_vocab, (rows,), generator=g).to(device)
    with torch.no_grad():  # half the rows: the projected teacher is right (the DSKD mask is not all zero)
        t2s_argmax = torch.cat([F.linear(t2s_hidden[i:i + 256], student_head[: shapes.student_vocab]).argmax(-1)
                                for i in range(0, rows, 256)])
    labels[::2] = t2s_argmax[::2]
    return Inputs(
        student_hidden=randn(rows, shapes.student_hidden).requires_grad_(),
        student_head=student_head,
        t2s_hidden=t2s_hidden,
        teacher_hidden=randn(rows, shapes.teacher_hidden),
        teacher_head=randn(shapes.teacher_head_rows, shapes.teacher_hidden, scale=0.08),
        s2t_hidden=randn(rows, shapes.teacher_hidden).requires_grad_(),
        labels=labels,
        student_mask=mask,
        teacher_mask=mask.clone(),
        num_items=float(rows),
        student_vocab=shapes.student_vocab,
        teacher_vocab=shapes.teacher_vocab,
    )


def combine(x: Inputs, ce, t2s_ce, t2s_div, s2t_div, t2s_scale, s2t_scale, kd_rate: float) -> torch.Tensor:
    """(1 − k)·CE + k·(t2s_ce + Σ scale·D_t2s + Σ u·D_s2t), each sum / num_items (the methods' dual_space_loss)."""
    s2t = s2t_div.sum() if s2t_scale is None else (s2t_div * s2t_scale).sum()
    kd = (t2s_ce + (t2s_div * t2s_scale).sum() + s2t) / x.num_items
    return (1.0 - kd_rate) * ce / x.num_items + kd_rate * kd


def rescaled(raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence rescaling of raw weights at the valid rows (positions,), back at the valid rows."""
    return rescale_per_sequence(scatter_valid(raw.detach(), mask), mask).reshape(-1).index_select(0, valid_rows(mask))


def loss_dense(x: Inputs, term: str, tau: float, kd_rate: float) -> torch.Tensor:
    """The KD terms as `methods/dskd.py` (`dual_space_terms`) and `modules/dwa.py` (`kd_scales`) build them today:
    dense logits at the valid rows, the chunked divergence op, token weights from those logits."""
    weights_on, gate_on = TERMS[term]
    v_s, v_t = x.student_vocab, x.teacher_vocab
    student_logits = F.linear(x.student_hidden, x.student_head)[:, :v_s]  # (P, V_s) `logits_at(rows)[:, :v_s]`
    ce = F.cross_entropy(student_logits.float(), x.labels, reduction="sum")
    head_s = x.student_head[:v_s].detach()
    t2s_logits = F.linear(x.t2s_hidden.to(head_s.dtype), head_s)  # (P, V_s)
    t2s_ce = F.cross_entropy(t2s_logits.to(compute_dtype(t2s_logits)), x.labels, reduction="sum")
    with torch.no_grad():
        t2s_correct = t2s_logits.argmax(-1).eq(x.labels)
    t2s_div = divergence(student_logits, t2s_logits.detach(), "fkl", tau)  # (P,)
    head_t = x.teacher_head[:v_t].detach()
    s2t_logits = F.linear(x.s2t_hidden.to(head_t.dtype), head_t)  # (Q, V_t)
    with torch.no_grad():
        teacher_logits = F.linear(x.teacher_hidden, x.teacher_head)[:, :v_t]  # (Q, V_t) the teacher's own head
    s2t_div = divergence(s2t_logits, teacher_logits, "fkl", tau)  # (Q,)
    if not weights_on:
        return combine(x, ce, t2s_ce, t2s_div, s2t_div, t2s_correct.float(), None, kd_rate)
    gate = peak_probability(t2s_logits.detach()) if gate_on else None
    w = student_token_weights(student_logits, x.student_mask, v_s, gate)
    u = teacher_token_weights(teacher_logits, x.teacher_mask, v_t)
    s_rows, t_rows = valid_rows(x.student_mask), valid_rows(x.teacher_mask)
    w_rows = w.weights.reshape(-1).index_select(0, s_rows)
    u_rows = u.weights.reshape(-1).index_select(0, t_rows)
    return combine(x, ce, t2s_ce, t2s_div, s2t_div, w_rows, u_rows, kd_rate)


def loss_rows(x: Inputs, term: str, tau: float, kd_rate: float, op: Callable, **op_kwargs) -> torch.Tensor:
    """The same loss from the per-row outputs of `fused_head_kd` (or of its dense reference, same contract)."""
    weights_on, gate_on = TERMS[term]
    v_s, v_t = x.student_vocab, x.teacher_vocab
    stats = ("pred_entropy", "target_peak") if weights_on and gate_on else ("pred_entropy",) if weights_on else ()
    student = op(x.student_hidden, x.student_head, x.t2s_hidden, x.student_head.detach(), vocab_size=v_s,
                 divergence="fkl", temperature=tau, pred_labels=x.labels, target_labels=x.labels,
                 statistics=(*stats, "target_argmax"), **op_kwargs)
    teacher = op(x.s2t_hidden, x.teacher_head, x.teacher_hidden, x.teacher_head, vocab_size=v_t,
                 divergence="fkl", temperature=tau, statistics=("target_entropy",) if weights_on else (), **op_kwargs)
    ce, t2s_ce = student.pred_ce.sum(), student.target_ce.sum()
    if not weights_on:
        mask = student.target_argmax.eq(x.labels).float()
        return combine(x, ce, t2s_ce, student.divergence, teacher.divergence, mask, None, kd_rate)
    raw_w = student.pred_entropy / math.log(v_s)
    if gate_on:
        raw_w = raw_w * student.target_peak
    raw_u = (1.0 - teacher.target_entropy / math.log(v_t)).clamp_min(0.0)
    w, u = rescaled(raw_w, x.student_mask), rescaled(raw_u, x.teacher_mask)
    return combine(x, ce, t2s_ce, student.divergence, teacher.divergence, w, u, kd_rate)


def build_loss(variant: str, x: Inputs, term: str, tau: float, kd_rate: float, chunk_elements: int) -> torch.Tensor:
    if variant == "fused":
        return loss_rows(x, term, tau, kd_rate, fused_head_kd, chunk_elements=chunk_elements)
    if variant == "autograd":
        return loss_rows(x, term, tau, kd_rate, head_kd_reference)
    return loss_dense(x, term, tau, kd_rate)


def one_pass(variant: str, x: Inputs, term: str, args: argparse.Namespace, device: torch.device,
             memory: bool) -> dict:
    """Forward + backward once: seconds (timed runs) or peak bytes (profiled run on CPU), loss value, gradients."""
    for t in x.trainable().values():
        t.grad = None
    gc.collect()

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            loss = build_loss(variant, x, term, args.temperature, args.kd_rate, args.chunk_elements)
        loss.backward()
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize()
    if memory and device.type == "cpu":
        value, peak = peak_bytes(step, device)
        return {"value": value, "peak_bytes": peak}
    start = time.perf_counter()
    if device.type == "cuda":
        value, peak = peak_bytes(step, device)
    else:
        value, peak = step(), None
    seconds = time.perf_counter() - start
    return {"value": value, "seconds": seconds, "peak_bytes": peak}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (the scale of a gradient, not of its smallest entries)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def bench_term(term: str, x: Inputs, args: argparse.Namespace, device: torch.device) -> dict:
    """Memory run per variant (also kept for the agreement check), then interleaved timed rounds."""
    variants = args.variants
    result: dict = {"variants": {v: {"samples_s": [], "peak_bytes": []} for v in variants}}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    values: dict[str, float] = {}
    for variant in variants:  # the profiled (CPU) or first (CUDA) run, also a warm-up
        out = one_pass(variant, x, term, args, device, memory=True)
        values[variant] = out["value"]
        result["variants"][variant]["peak_bytes"].append(out["peak_bytes"])
        grads[variant] = {k: t.grad.detach().clone() for k, t in x.trainable().items()}
        print(f"  {term:13s} {variant:8s} loss {out['value']:.6f}  peak {out['peak_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    base = "dense" if "dense" in variants else variants[0]
    result["agreement_vs_" + base] = {
        v: {"loss_relative": abs(values[v] - values[base]) / max(abs(values[base]), 1e-30),
            **{f"grad_{k}": relative_error(grads[v][k], grads[base][k]) for k in grads[base]}}
        for v in variants if v != base
    }
    del grads
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for variant in order:
            out = one_pass(variant, x, term, args, device, memory=False)
            entry = result["variants"][variant]
            entry["samples_s"].append(out["seconds"])
            if out["peak_bytes"] is not None:
                entry["peak_bytes"].append(out["peak_bytes"])
            print(f"  {term:13s} {variant:8s} round {r}: {out['seconds']:.2f} s  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    for entry in result["variants"].values():
        if entry["samples_s"]:
            entry["median_s"] = statistics.median(entry["samples_s"])
            entry["best_s"] = min(entry["samples_s"])
        entry["peak_mib"] = max(entry["peak_bytes"]) / 2**20
    if "fused" in variants:
        fused = result["variants"]["fused"]
        for other in variants:
            if other == "fused":
                continue
            entry = result["variants"][other]
            ratios = {"memory_ratio": max(entry["peak_bytes"]) / max(fused["peak_bytes"])}
            if entry["samples_s"] and fused["samples_s"]:
                ratios["speedup_median"] = entry["median_s"] / fused["median_s"]
                ratios["speedup_best"] = entry["best_s"] / fused["best_s"]
            result[f"{other}_over_fused"] = ratios
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", default=",".join(TERMS), help=f"comma list from {list(TERMS)}")
    parser.add_argument("--variants", default="fused,dense", help=f"comma list from {list(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the memory run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("off", "bf16"), default="off")
    parser.add_argument("--temperature", type=float, default=2.0, help="τ (the methods' default kd_temperature)")
    parser.add_argument("--kd-rate", type=float, default=0.5)
    parser.add_argument("--chunk-elements", type=int, default=None, help="fused op's (rows, V) budget per temporary")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in args.variants if v not in VARIANTS] + [t for t in args.terms.split(",") if t not in TERMS]
    if unknown:
        parser.error(f"unknown variants/terms {unknown}")
    if args.chunk_elements is None:
        from dwakd.ops.fused_kd import CHUNK_ELEMENTS
        args.chunk_elements = CHUNK_ELEMENTS
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = QUICK if args.quick else Shapes()
    out_path = Path(args.out or ROOT / "benchmarks" / "results" /
                    f"kd_loss_{device.type}{'_quick' if args.quick else ''}.json")
    report: dict = {
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg(),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
        "shapes": vars(shapes), "temperature": args.temperature, "kd_rate": args.kd_rate,
        "autocast": args.autocast, "chunk_elements": args.chunk_elements, "rounds": args.rounds, "terms": {},
    }
    x = make_inputs(shapes, device)
    for term in args.terms.split(","):
        report["terms"][term] = bench_term(term, x, args, device)
        res = report["terms"][term]
        line = f"{term:13s}"
        for variant, entry in res["variants"].items():
            line += f"  {variant} {entry.get('median_s', float('nan')):.2f} s / {entry['peak_mib']:.0f} MiB"
        print(line, flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))  # partial results survive an interrupted run
    report["machine"]["load_average_end"] = os.getloadavg()
    out_path.write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
