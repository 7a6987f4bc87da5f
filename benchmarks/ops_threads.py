"""Benchmark: dwakd's numba CPU kernels in torch's OpenMP team vs on a pool of Python threads, as a step calls them.

In a training step every kernel call follows a parallel torch op, after which libgomp's idle workers spin on the
other cores (`dwakd.ops._threads`). Each timed call here is preceded by such an op (an in-place add over the
kernel's input), then runs with `ops_threads("openmp")` or `ops_threads("python")`, the two modes alternating
round by round so background load hits both alike. Kernels: the Soft-DTW divergence (forward + backward) of
(8, 256, 64) sequences, the forward-KL row kernel (value, then gradient) and the row entropy/peak kernel on
(240, 151,646) float32 logits (the tiny recipe's teacher vocabulary). Reports medians, best-of-N and the paired
per-round ratio python / openmp.

    PYTHONPATH=src python benchmarks/ops_threads.py --rounds 21 --out benchmarks/results/ops_threads_epyc.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dwakd.ops._threads import ops_threads, uses_openmp_team  # noqa: E402
from dwakd.ops.row_kl import fkl_rows_backward, fkl_rows_forward  # noqa: E402
from dwakd.ops.row_stats import row_entropy_peak  # noqa: E402
from dwakd.ops.soft_dtw import soft_dtw_divergence  # noqa: E402

MODES = ("openmp", "python")


def kernels(rows: int, vocab: int) -> dict[str, Callable[[], None]]:
    """name -> one call preceded by a parallel torch op on its input, as in a step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, 64, generator=gen, requires_grad=True)
    y = torch.randn(8, 256, 64, generator=gen, requires_grad=True)
    student = torch.randn(rows, vocab, generator=gen) * 3
    teacher = torch.randn(rows, vocab, generator=gen) * 3
    grad = torch.empty_like(student)

    def divergence() -> None:
        with torch.no_grad():
            x.add_(0.0)
        soft_dtw_divergence(x, y, 0.1).sum().backward()

    def row_kl() -> None:
        student.add_(0.0)
        _, undone, saved, _ = fkl_rows_forward(student, teacher, None, None, 1.0)
        assert not bool(undone.any())
        fkl_rows_backward(student, teacher, None, None, 1.0, torch.ones(rows), saved, grad)

    def row_stats() -> None:
        student.add_(0.0)
        row_entropy_peak(student)

    return {"soft_dtw_divergence 8x256x64": divergence, f"row_kl fwd+bwd {rows}x{vocab}": row_kl,
            f"row_stats {rows}x{vocab}": row_stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--vocab", type=int, default=151_646)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ops_threads.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not uses_openmp_team():
        raise SystemExit("torch's OpenMP team is not available here (not libgomp, or DWAKD_OPS_THREADS=python)")
    result = {"torch": torch.__version__, "machine": platform.platform(), "processor": platform.processor(),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "command": " ".join(sys.argv),
              "load_before": os.getloadavg(), "kernels": {}}
    for name, call in kernels(args.rows, args.vocab).items():
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        for index in range(args.warmup + args.rounds):
            for mode in MODES if index % 2 == 0 else MODES[::-1]:
                with ops_threads(mode):
                    start = time.perf_counter()
                    call()
                    seconds = time.perf_counter() - start
                if index >= args.warmup:
                    samples[mode].append(seconds)
        ratios = [p / o for p, o in zip(samples["python"], samples["openmp"], strict=True)]
        entry = {m: {"samples_s": samples[m], "median_s": statistics.median(samples[m]), "best_s": min(samples[m])}
                 for m in MODES}
        entry["paired_median_ratio_python_over_openmp"] = statistics.median(ratios)
        result["kernels"][name] = entry
        print(f"{name}: openmp {entry['openmp']['median_s'] * 1e3:.2f} ms (best {entry['openmp']['best_s'] * 1e3:.2f})"
              f", python {entry['python']['median_s'] * 1e3:.2f} ms (best {entry['python']['best_s'] * 1e3:.2f}), "
              f"python / openmp {entry['paired_median_ratio_python_over_openmp']:.2f}", flush=True)
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"load average before {result['load_before']}, after {result['load_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
