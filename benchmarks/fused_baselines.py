"""Benchmark: the vocabulary-sized terms of ULD, MultiLevelOT, ALM and CDM at paper shapes, fused heads vs dense
logits.

Random hidden states and heads, no models (so it runs on CPU): 1,024 rows (batch 4 × 256 response tokens), student
hidden 768 with GPT-2's 50,257-token head (trained: gradient to the rows and the head), teacher hidden 2048 with a
Qwen-sized 151,936-row head of which 151,646 are real tokens (frozen). The CE every method has is not part of this.

- `uld`: Σ_rows of ULD's sorted-probability L1, row i of one side paired with row i of the other.
  `fused`: `dwakd.ops.fused_kd.fused_head_sorted_l1` on hidden rows and head weights (`head_fusion: fused`);
  `dense`: the method's `head_fusion: dense` path, `F.linear` logits and `uld_distance_sum`.
- `top_columns`: MultiLevelOT's steps 1–2 on both sides (std-normalised softmax, the k = 50 columns with the largest
  sums), the student's (rows, 50) output weighted by a fixed random tensor (what the method's L1, CE_log and
  Sinkhorn then see is (rows, 50) either way). `fused`: `dwakd.ops.fused_kd.fused_head_top_columns` on both sides;
  `dense`: `F.linear` logits and `std_normalised_probs` + `top_columns`, as `head_fusion: dense`.
- `alm`: ALM's per-row log p(label) and space log-mass on both sides (random labels; a fixed random space set of
  about a third of each vocabulary), the student's two (rows,) outputs weighted by fixed random tensors (what the
  chunk scores then see is (rows,) either way). `fused`: `dwakd.ops.fused_kd.fused_head_label_log_probs` on both
  sides; `dense`: `F.linear` logits and `label_log_probs`, as `head_fusion: dense`.
- `cdm`: CDM's head terms on both sides (`dwakd.methods.cdm.LabelRows`, what `compute_loss` calls): each label
  row's entropy, rows pooled by a plan that averages consecutive pairs (512 pooled rows), each pooled row's top-100
  columns, and 200 gathered columns per pooled row (the side's own top-100 and 100 fixed random ids standing in for
  the mapped candidates of the other side; the candidate mapping itself is CPU string work, not a head term), the
  student's (G, 200) columns weighted by a fixed random weight per vocabulary column. `fused`: hidden rows and head
  weights (`head_entropy`, `head_topk`, `gathered_head_logits`); `dense`: `F.linear` logits, as `head_fusion: dense`.

Measured per variant: seconds of forward + backward, rounds interleaved (the order alternating every round); peak
tensor memory from a separate profiled pass (`dwakd.evaluation.memory.peak_bytes`, bytes above those live before:
it counts the gradient buffers, e.g. the 154 MB student-head gradient, alike in both); the agreement of the value
and of both gradients. NumPy's sort buffers are not tensors and are not counted (one chunk's in `fused`, the same
chunk size in `dense`).

    PYTHONPATH=src python benchmarks/fused_baselines.py                 # paper shapes, CPU (several minutes)
    PYTHONPATH=src python benchmarks/fused_baselines.py --quick         # small shapes: a smoke run in seconds
    PYTHONPATH=src python benchmarks/fused_baselines.py --terms uld --device cuda --autocast bf16

Writes benchmarks/results/fused_baselines_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dwakd.evaluation.memory import peak_bytes  # noqa: E402
from dwakd.methods.cdm import LabelRows  # noqa: E402
from dwakd.methods.multilevel_ot import std_normalised_probs, top_columns  # noqa: E402
from dwakd.methods.uld import uld_distance_sum  # noqa: E402
from dwakd.ops.fused_kd import fused_head_sorted_l1  # noqa: E402
from dwakd.ops.fused_kd.label_log_probs import fused_head_label_log_probs, label_log_probs  # noqa: E402
from dwakd.ops.fused_kd.top_columns import fused_head_top_columns  # noqa: E402

TERMS = ("uld", "top_columns", "alm", "cdm")
CDM_TOP_K = 100
TOP_K = 50
PAPER = {"rows": 1024, "d_s": 768, "v_s": 50257, "d_t": 2048, "v_t": 151646, "head_t": 151936}
QUICK = {"rows": 64, "d_s": 32, "v_s": 3000, "d_t": 48, "v_t": 5000, "head_t": 5100}


def make_inputs(shapes: dict, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device)

    return {"s_hidden": randn(shapes["rows"], shapes["d_s"], scale=1.0).requires_grad_(True),
            "s_weight": randn(shapes["v_s"], shapes["d_s"], scale=shapes["d_s"] ** -0.5 * 2).requires_grad_(True),
            "t_hidden": randn(shapes["rows"], shapes["d_t"], scale=1.0),
            "t_weight": randn(shapes["head_t"], shapes["d_t"], scale=shapes["d_t"] ** -0.5 * 3),
            "upstream": randn(shapes["rows"], TOP_K, scale=1.0),
            "s_labels": torch.randint(shapes["v_s"], (shapes["rows"],), generator=gen).to(device),
            "t_labels": torch.randint(shapes["v_t"], (shapes["rows"],), generator=gen).to(device),
            "s_space": (torch.rand(shapes["v_s"], generator=gen) < 1 / 3).to(device),
            "t_space": (torch.rand(shapes["v_t"], generator=gen) < 1 / 3).to(device),
            "s_others": torch.randint(shapes["v_s"], (shapes["rows"] // 2, CDM_TOP_K), generator=gen).to(device),
            "t_others": torch.randint(shapes["v_t"], (shapes["rows"] // 2, CDM_TOP_K), generator=gen).to(device),
            "column_weights": randn(shapes["v_s"], scale=1.0)}


def term(name: str, variant: str, x: dict, shapes: dict) -> torch.Tensor:
    functions = {"uld": uld_term, "top_columns": top_columns_term, "alm": alm_term, "cdm": cdm_term}
    return functions[name](variant, x, shapes)


def uld_term(variant: str, x: dict, shapes: dict) -> torch.Tensor:
    """Σ over the row pairs of ULD's sorted-probability L1."""
    if variant == "fused":
        return fused_head_sorted_l1(x["s_hidden"], x["s_weight"], shapes["v_s"], shapes["v_t"],
                                    t_hidden=x["t_hidden"], t_weight=x["t_weight"])
    s_logits = F.linear(x["s_hidden"], x["s_weight"])  # (rows, V_s): the heads at the rows, as `uld` forms them
    with torch.no_grad():
        t_logits = F.linear(x["t_hidden"], x["t_weight"])  # (rows, H_t)
    rows = torch.arange(shapes["rows"], device=s_logits.device)
    return uld_distance_sum(s_logits, t_logits, rows, rows, shapes["v_s"], shapes["v_t"])


def top_columns_term(variant: str, x: dict, shapes: dict) -> torch.Tensor:
    """Σ G ⊙ p̂_s plus the teacher's p̂_t (formed, without gradient, and summed so that it is not optimised away)."""
    if variant == "fused":
        p_s = fused_head_top_columns(x["s_hidden"], x["s_weight"], shapes["v_s"], 1.0, TOP_K)
        with torch.no_grad():
            p_t = fused_head_top_columns(x["t_hidden"], x["t_weight"], shapes["v_t"], 1.0, TOP_K)
    else:
        p_s = top_columns(std_normalised_probs(F.linear(x["s_hidden"], x["s_weight"]), None, shapes["v_s"], 1.0),
                          TOP_K)
        with torch.no_grad():
            p_t = top_columns(std_normalised_probs(F.linear(x["t_hidden"], x["t_weight"]), None, shapes["v_t"], 1.0),
                              TOP_K)
    return (p_s * x["upstream"]).sum() + p_t.sum()


def alm_term(variant: str, x: dict, shapes: dict) -> torch.Tensor:
    """Σ a·log p_s(label) + b·space log-mass of the student plus the teacher's two sums (formed without gradient)."""
    def side(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, labels: torch.Tensor, space: torch.Tensor):
        if variant == "fused":
            return fused_head_label_log_probs(hidden, weight, vocab, labels, space)
        return label_log_probs(F.linear(hidden, weight), labels, vocab, space)  # `head_fusion: dense`

    label_s, space_s = side(x["s_hidden"], x["s_weight"], shapes["v_s"], x["s_labels"], x["s_space"])
    with torch.no_grad():
        label_t, space_t = side(x["t_hidden"], x["t_weight"], shapes["v_t"], x["t_labels"], x["t_space"])
    return (label_s * x["upstream"][:, 0]).sum() + (space_s * x["upstream"][:, 1]).sum() + label_t.sum() + space_t.sum()


def cdm_term(variant: str, x: dict, shapes: dict) -> torch.Tensor:
    """Σ w[col]·(student's gathered pooled logit at col), plus the entropies' and the teacher's columns' sums. The
    weight is per vocabulary column, not per position, so two top-k candidates that tie within rounding and come out
    in either order (the fused path pools before the head) weigh the same, as they do in CDM's KL."""
    rows = shapes["rows"]
    device = x["s_hidden"].device
    plan = (torch.arange(rows, device=device) // 2, torch.arange(rows, device=device),
            torch.full((rows,), 0.5, dtype=torch.float64, device=device))  # consecutive pairs averaged

    def side(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, others: torch.Tensor) -> tuple:
        label_rows = (LabelRows(hidden, weight, vocab) if variant == "fused"
                      else LabelRows(F.linear(hidden, weight), None, vocab))  # `head_fusion: dense`
        pooled = label_rows.pooled(plan, rows // 2)
        cols = torch.cat([pooled.top(CDM_TOP_K), others], 1)  # (G, 2k)
        return label_rows.entropy(), pooled.columns(cols), cols

    entropy_s, values_s, cols_s = side(x["s_hidden"], x["s_weight"], shapes["v_s"], x["s_others"])
    with torch.no_grad():
        entropy_t, values_t, _ = side(x["t_hidden"], x["t_weight"], shapes["v_t"], x["t_others"])
    return (values_s * x["column_weights"][cols_s]).sum() + values_t.sum() + entropy_s.sum() + entropy_t.sum()


def one_pass(name: str, variant: str, x: dict, shapes: dict, autocast: torch.dtype | None, device: torch.device):
    for t in (x["s_hidden"], x["s_weight"]):
        t.grad = None
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        value = term(name, variant, x, shapes)
    value.backward()
    return value.detach(), x["s_hidden"].grad.clone(), x["s_weight"].grad.clone()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--terms", default=",".join(TERMS), help=f"comma list of {', '.join(TERMS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("bf16",), default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = [t for t in args.terms.split(",") if t]
    if not names or any(t not in TERMS for t in names):
        parser.error(f"--terms takes a comma list of {', '.join(TERMS)}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else PAPER
    autocast = torch.bfloat16 if args.autocast else None
    x = make_inputs(shapes, device)
    record = {"shapes": shapes, "device": str(device), "autocast": args.autocast, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "load_average_start": os.getloadavg(), "command": " ".join(sys.argv), "terms": {}}
    for name in names:
        record["terms"][name] = bench_term(name, x, shapes, autocast, device, args.rounds)
    record["load_average_end"] = os.getloadavg()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"fused_baselines_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


def bench_term(name: str, x: dict, shapes: dict, autocast: torch.dtype | None, device: torch.device,
               rounds: int) -> dict:
    """Agreement, interleaved timings and profiled peaks of one term's two variants."""
    variants = ("fused", "dense")
    results = {v: one_pass(name, v, x, shapes, autocast, device) for v in variants}  # warm-up, and the agreement
    agreement = {"value": relative(results["fused"][0], results["dense"][0]),
                 "grad_hidden": relative(results["fused"][1], results["dense"][1]),
                 "grad_head": relative(results["fused"][2], results["dense"][2])}
    del results
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for v in (variants if round_ % 2 == 0 else variants[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            one_pass(name, v, x, shapes, autocast, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[v].append(time.perf_counter() - start)
    peaks = {}
    for v in variants:
        for t in (x["s_hidden"], x["s_weight"]):
            t.grad = None  # outside the profiled pass: freed there, they would lower its baseline
        peaks[v] = peak_bytes(lambda v=v: one_pass(name, v, x, shapes, autocast, device), device)[1]
    summary = {v: {"median_s": statistics.median(s), "best_s": min(s), "peak_mib": peaks[v] / 2**20}
               for v, s in samples.items()}
    summary["dense_over_fused"] = {"time_median": summary["dense"]["median_s"] / summary["fused"]["median_s"],
                                   "peak": peaks["dense"] / max(1, peaks["fused"])}
    for v in variants:
        s = summary[v]
        print(f"{name} {v}: {s['median_s']:.3f} s median, {s['best_s']:.3f} s best, peak {s['peak_mib']:.1f} MiB")
    print(f"{name} dense / fused: time {summary['dense_over_fused']['time_median']:.2f}x, "
          f"peak {summary['dense_over_fused']['peak']:.2f}x; agreement {agreement}")
    return {"agreement": agreement, "summary": summary, "samples": samples}


if __name__ == "__main__":
    main()
