"""Benchmark: 16-bit matmuls on this CPU against float32, at an LM head's shape, in the three layouts a step uses.

Why: `training.bf16: true` on a CPU runs every model product and the LM heads in bf16 under autocast. A CPU with
native bf16 instructions (AVX512-BF16, AMX) runs those faster than fp32; one without (AVX2-only) has oneDNN emulate
them, and how slow that is depends on the operands' layout. `dwakd train` warns when a CPU run would compute in a
dtype this CPU emulates (`dwakd.ops.autocast.emulated_on_cpu`); this script measures what the warning is about.

Products, hidden h (rows, d), head W (V, d), logit gradient g (rows, V) — the three GEMMs of a linear LM head:
- `forward`  h·Wᵀ (`F.linear`'s forward: the right operand a transposed view of the contiguous head);
- `grad_hidden`  g·W (the gradient w.r.t. the hidden rows: a contiguous right operand);
- `grad_head`  gᵀ·h (the head's gradient).
Each dtype runs every product `--rounds` times, dtypes interleaved round by round; medians, best-of-N and the
ratio of medians to float32 are written as JSON.

    PYTHONPATH=src python benchmarks/cpu_half_matmul.py --threads 1 \
        --out benchmarks/results/cpu_half_matmul_epyc_avx2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dwakd.ops.autocast import emulated_on_cpu  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def products(rows: int, vocab: int, hidden: int, dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (left, right) operands of one of the head's three GEMMs, in `dtype` and the layout a step uses."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = torch.randn(vocab, hidden, generator=gen).to(dtype)
    g = torch.randn(rows, vocab, generator=gen).to(dtype)
    return {"forward": (h, w.t()), "grad_hidden": (g, w), "grad_head": (g.t(), h)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="hidden rows (label positions of a batch)")
    parser.add_argument("--vocab", type=int, default=20000, help="head rows")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    operands = {name: products(a.rows, a.vocab, a.hidden, DTYPES[name]) for name in a.dtypes}
    times: dict[str, dict[str, list[float]]] = {d: {p: [] for p in operands[d]} for d in a.dtypes}
    for dtype in a.dtypes:  # warm-up: oneDNN picks and caches its kernels on the first call of a shape
        for left, right in operands[dtype].values():
            torch.mm(left, right)
    for _ in range(a.rounds):
        for dtype in a.dtypes:
            for name, (left, right) in operands[dtype].items():
                start = time.perf_counter()
                torch.mm(left, right)
                times[dtype][name].append(time.perf_counter() - start)
    results = {}
    for dtype in a.dtypes:
        results[dtype] = {"emulated": emulated_on_cpu(DTYPES[dtype])}
        for name, seconds in times[dtype].items():
            entry = {"median_s": statistics.median(seconds), "best_s": min(seconds)}
            if "float32" in times and dtype != "float32":
                entry["median_vs_float32"] = entry["median_s"] / statistics.median(times["float32"][name])
            results[dtype][name] = entry
            ratio = f", {entry['median_vs_float32']:.1f}x float32" if "median_vs_float32" in entry else ""
            print(f"{dtype:9s} {name:12s} median {entry['median_s']:.4f} s best {entry['best_s']:.4f} s{ratio}")
    report = {"shape": {"rows": a.rows, "vocab": a.vocab, "hidden": a.hidden}, "rounds": a.rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "command": " ".join(sys.argv),
              "results": results}
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
