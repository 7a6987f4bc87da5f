"""Benchmark: the dense path's cross-entropy per row (`dwakd.ops.row_ce.label_ce_rows`) against `F.cross_entropy`
plus `argmax` (what the methods ran before), forward + backward, on CPU.

Shapes: the tiny recipe's label rows (379 × 50,257, the student side), the same rows over the teacher's 151,646
columns, a short batch (64 × 50,257), and the paper's 1,024 response rows × 50,257. Rounds interleave the two
variants; each variant's seconds (median, best) and peak tensor memory above its inputs are written to JSON, with
the ratio of the medians and the largest difference of value and gradient between the two.

    PYTHONPATH=src python benchmarks/row_ce.py --threads 2 --out benchmarks/results/row_ce_cpu.json
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
from dwakd.ops.row_ce import label_ce_rows  # noqa: E402

SHAPES = {"tiny_student": (379, 50_257), "tiny_teacher_vocab": (396, 151_646), "short": (64, 50_257),
          "paper_student": (1_024, 50_257)}


def torch_ce(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the dense paths ran before: F.cross_entropy in fp32 and a separate argmax."""
    return F.cross_entropy(z, labels, reduction="none"), z.detach().argmax(-1)


VARIANTS = {"torch": torch_ce, "row_ce": lambda z, labels: label_ce_rows(z, labels, with_argmax=True)}


def one_pass(fn, z: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor):
    z.grad = None
    ce, argmax = fn(z, labels)
    (ce * grad_out).sum().backward()
    return ce.detach(), argmax, z.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "row_ce_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.shapes.split(","):
        rows, vocab = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        z = (torch.randn(rows, vocab, generator=gen) * 2).requires_grad_(True)
        labels = torch.randint(0, vocab, (rows,), generator=gen)
        grad_out = torch.rand(rows, generator=gen)
        outs = {v: one_pass(fn, z, labels, grad_out) for v, fn in VARIANTS.items()}  # warm-up (numba cache load)
        peaks = {}
        for v, fn in VARIANTS.items():
            z.grad = None
            _, peaks[v] = peak_bytes(lambda fn=fn, z=z, labels=labels, g=grad_out: one_pass(fn, z, labels, g))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
                start = time.perf_counter()
                one_pass(VARIANTS[v], z, labels, grad_out)
                times[v].append(time.perf_counter() - start)
        entry = {"rows": rows, "vocab": vocab}
        for v in VARIANTS:
            entry[v] = {"samples_s": times[v], "median_s": statistics.median(times[v]), "best_s": min(times[v]),
                        "peak_mib": peaks[v] / 2**20}
        entry["torch_over_row_ce_median"] = entry["torch"]["median_s"] / entry["row_ce"]["median_s"]
        entry["max_value_diff"] = float((outs["torch"][0] - outs["row_ce"][0]).abs().max())
        entry["max_grad_diff"] = float((outs["torch"][2] - outs["row_ce"][2]).abs().max())
        entry["argmax_equal"] = bool(torch.equal(outs["torch"][1], outs["row_ce"][1]))
        results[name] = entry
        print(f"{name:20s} {rows:5d} × {vocab:6d}: torch {entry['torch']['median_s'] * 1e3:7.1f} ms "
              f"({entry['torch']['peak_mib']:6.0f} MiB), row_ce {entry['row_ce']['median_s'] * 1e3:7.1f} ms "
              f"({entry['row_ce']['peak_mib']:6.0f} MiB): {entry['torch_over_row_ce_median']:.2f}×; "
              f"value diff {entry['max_value_diff']:.1e}, grad diff {entry['max_grad_diff']:.1e}")
    record = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "machine": platform.platform(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "rounds": args.rounds, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
