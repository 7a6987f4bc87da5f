"""Benchmark: a CPU training step with glibc's malloc as it is vs keeping freed memory (`dwakd.cpu_memory`).

Each measurement runs in a fresh process (the malloc setting is process-wide and resident memory never falls back),
the two policies alternating round by round: the run is built as `dwakd train` builds it (which applies the
policy `DWAKD_CPU_MALLOC` names), then `--warmup` unmeasured and `--steps` measured forward + backward passes on
the run's own batches. Per pass it records wall seconds, user and system CPU seconds and minor page faults; per
process the peak resident set (ru_maxrss). Writes JSON with every sample, medians, and keep / system ratios.

    PYTHONPATH=src python benchmarks/cpu_malloc.py --methods dskd,dwakd --threads 1 --rounds 3 \
        --out benchmarks/results/cpu_malloc_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("system", "keep")


def child(config: str, method: str, batch_size: int, warmup: int, steps: int, threads: int) -> dict:
    """One process's measurement (run with the policy already in the environment)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from method_steps import build, one_pass

    torch.set_num_threads(threads)
    model, loader = build(config, method, batch_size, [])
    from dwakd import cpu_memory

    samples = []
    for index in range(warmup + steps):
        batch = next(loader)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        one_pass(model, batch)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        if index >= warmup:
            samples.append({"wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                            "sys_s": after.ru_stime - before.ru_stime,
                            "minor_faults": after.ru_minflt - before.ru_minflt})
    return {"samples": samples, "applied": cpu_memory._applied,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--methods", default="dskd,dwakd")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="processes per (method, policy), alternating")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_malloc.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.child, args.batch_size, args.warmup, args.steps, args.threads)))
        return
    methods = [m for m in args.methods.split(",") if m]
    runs: dict[str, dict[str, list[dict]]] = {m: {p: [] for p in POLICIES} for m in methods}
    for round_index in range(args.rounds):
        for method in methods:
            for policy in POLICIES if round_index % 2 == 0 else POLICIES[::-1]:
                env = {**os.environ, "DWAKD_CPU_MALLOC": policy, "PYTHONPATH": str(ROOT / "src")}
                command = [sys.executable, __file__, "--child", method, "--config", args.config,
                           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                           "--warmup", str(args.warmup), "--steps", str(args.steps)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if result["applied"] != (policy == "keep"):
                    raise SystemExit(f"{method}/{policy}: the policy was not applied as asked")
                runs[method][policy].append(result)
                med = statistics.median(s["wall_s"] for s in result["samples"])
                print(json.dumps({"round": round_index, "method": method, "policy": policy, "median_wall_s": med,
                                  "peak_rss_gib": round(result["peak_rss_gib"], 3)}), flush=True)
    summary = {}
    for method, by_policy in runs.items():
        entry = {}
        for policy, results in by_policy.items():
            samples = [s for r in results for s in r["samples"]]
            entry[policy] = {key: statistics.median(s[key] for s in samples)
                             for key in ("wall_s", "user_s", "sys_s", "minor_faults")}
            entry[policy]["peak_rss_gib"] = statistics.median(r["peak_rss_gib"] for r in results)
        entry["keep_over_system"] = {key: entry["keep"][key] / entry["system"][key]
                                     for key in ("wall_s", "peak_rss_gib")}
        summary[method] = entry
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": os.path.relpath(args.config, ROOT), "command": " ".join(sys.argv),
                               "machine": platform.platform(), "processor": platform.processor(),
                               "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
                               "warmup": args.warmup, "steps": args.steps, "load": os.getloadavg(),
                               "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
