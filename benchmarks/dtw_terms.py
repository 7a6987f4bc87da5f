"""Benchmark: DWA-KD's two response Soft-DTW terms (hidden states, embeddings) outside a model, values only and with
the backward, at the demo's size by default.

Two ways side by side, round after round: `shared` builds one `response_grid` (each mask sorted once, the band read
from the attention once) and runs both layers' `grid_dtw_divergence` on it, as DWA-KD does; `per-term` calls
`response_dtw_divergence` once per layer, each building its own grid. `grid` times the shared set-up alone
(`response_grid`: both masks' slots and the band). `--src` runs the same measurement on another
checkout's `src` (one that predates `response_grid` runs `per-term` only), e.g. the code before the shared grid:

    PYTHONPATH=src python benchmarks/dtw_terms.py
    git worktree add /tmp/old d9d95d1 && python benchmarks/dtw_terms.py --src /tmp/old/src --out /tmp/old.json

Writes benchmarks/results/dtw_terms.json (or --out): every sample, medians, best-of-N, per-term / shared ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(ROOT / "src"), help="the dwakd sources to measure")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="60,100,128,90,40,128,77,110",
                        help="student response lengths; the teacher's are 10 %% longer (comma list, one per sequence)")
    parser.add_argument("--dim", type=int, default=128, help="feature width of both layers")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dtw_terms.json"))
    args = parser.parse_args()
    sys.path.insert(0, args.src)
    import torch

    from dwakd.modules import dtw

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    student_len = [int(v) for v in args.lengths.split(",")][: args.batch]
    if len(student_len) != args.batch:
        parser.error(f"--lengths needs {args.batch} values")
    teacher_len = [round(v * 1.1) for v in student_len]
    n, m = max(student_len) + 100, max(teacher_len) + 110  # prompt and padding around the responses
    mask_s = torch.zeros(args.batch, n, dtype=torch.bool)
    mask_t = torch.zeros(args.batch, m, dtype=torch.bool)
    for b in range(args.batch):
        mask_s[b, 100:100 + student_len[b]] = True
        mask_t[b, 110:110 + teacher_len[b]] = True
    students = [torch.randn(args.batch, n, args.dim, generator=gen, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(args.batch, m, args.dim, generator=gen) for _ in range(2)]
    attention = torch.softmax(torch.randn(args.batch, n, m, generator=gen), -1)
    lengths = (student_len, teacher_len)

    def per_term() -> list:
        return [dtw.response_dtw_divergence(x, y, mask_s, mask_t, 1.5, attention, lengths=lengths)
                for x, y in zip(students, teachers, strict=True)]

    def shared() -> list:
        grid = dtw.response_grid(mask_s, mask_t, lengths, attention)
        return [dtw.grid_dtw_divergence(x, y, grid, 1.5) for x, y in zip(students, teachers, strict=True)]

    ways = {"per-term": per_term}
    if hasattr(dtw, "response_grid"):
        ways["shared"] = shared

    def values_only(way) -> None:
        with torch.no_grad():
            way()

    def with_backward(way) -> None:
        sum(v.sum() for v in way()).backward()
        for x in students:
            x.grad = None

    def grid_only(_way) -> None:
        with torch.no_grad():
            dtw.response_grid(mask_s, mask_t, lengths, attention)

    kinds = {"values": values_only, "backward": with_backward, "grid": grid_only}  # grid: the set-up alone
    samples: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in kinds if kind != "grid" or name == "shared"} for name in ways}
    for round_ in range(args.rounds + 1):  # the first round warms up (numba compilation, caches)
        for name, way in ways.items():
            for kind in samples[name]:
                run = kinds[kind]
                start = time.perf_counter()
                run(way)
                if round_:
                    samples[name][kind].append(time.perf_counter() - start)
    summary = {name: {kind: {"median_ms": statistics.median(v) * 1e3, "best_ms": min(v) * 1e3}
                      for kind, v in kinds.items()} for name, kinds in samples.items()}
    if "shared" in summary:
        for kind in ("values", "backward"):
            ratios = [a / b for a, b in zip(samples["per-term"][kind], samples["shared"][kind], strict=True)]
            summary["per-term"][kind]["paired_median_ratio_to_shared"] = statistics.median(ratios)
    for name, kinds in summary.items():
        print(name, ", ".join(f"{kind} median {v['median_ms']:.2f} ms best {v['best_ms']:.2f} ms"
                              + (f" ({v['paired_median_ratio_to_shared']:.2f}x shared)"
                                 if "paired_median_ratio_to_shared" in v else "") for kind, v in kinds.items()))
    record = {"src": args.src, "batch": args.batch, "student_lengths": student_len, "teacher_lengths": teacher_len,
              "dim": args.dim, "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
              "summary": summary, "samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
