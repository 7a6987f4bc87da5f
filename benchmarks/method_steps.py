"""Benchmark: forward + backward time of several methods on the same batches, interleaved round by round.

`dwakd bench` measures each method in turn (paper Table 7's protocol); on a shared machine the load changes between
methods. This script builds every method's run exactly as `dwakd train` does (same config, same data order), then
times one forward + backward of each method's `DistillationModel` on the same real batch, method after method,
round after round, so background load hits all alike. Reports medians and best-of-N per method and batch size,
and the load average before and after.

    PYTHONPATH=src python benchmarks/method_steps.py                                   # dwakd, cdm, alm, dskd
    PYTHONPATH=src python benchmarks/method_steps.py --methods dwakd,cdm --batch-sizes 4,1 --rounds 9
    PYTHONPATH=src python benchmarks/method_steps.py --methods dskd,dskd:head_fusion=dense,dwakd,dwakd:head_fusion=dense
    PYTHONPATH=src python benchmarks/method_steps.py --methods dskd,dwakd --batch-sizes 4 --clock cpu --threads 1 \
        --memory --out benchmarks/results/dwakd_vs_dskd_cpu.json          # DWA-KD's cost over DSKD, load-robust

A method entry `name:key=value+key=value` sets method options for that entry only (`method.options.key=value`);
a suffix `@python` or `@openmp` runs that entry's numba kernels on Python threads or in torch's OpenMP team
(`dwakd.ops._threads.ops_threads`), e.g. `--methods dskd,dskd@python` measures what the OpenMP team saves:

    PYTHONPATH=src python benchmarks/method_steps.py --methods dskd,dskd@python,dwakd,dwakd@python --batch-sizes 4

Writes benchmarks/results/method_steps.json (or --out): every sample, medians, best-of-N, ratios to the first method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dwakd.config import load_config  # noqa: E402
from dwakd.ops._threads import ops_threads  # noqa: E402
from dwakd.run import build_training  # noqa: E402


def build(config_path: str, method: str, batch_size: int, overrides: list[str]):
    """(model, batches) of one method: the `dwakd train` run's model and its first training batches."""
    method = method.partition("@")[0]  # `@python` / `@openmp`: how its kernels are threaded (see `threading`)
    method, _, options = method.partition(":")  # `name:key=value+key=value`: options of this entry only
    overrides = [*overrides, *(f"method.options.{item}" for item in options.split("+") if item)]
    with tempfile.TemporaryDirectory() as out_dir:
        config = load_config(config_path, [f"method={method}", f"output_dir={out_dir}", "data.eval=null",
                                           "training.max_steps=1",
                                           f"training.per_device_train_batch_size={batch_size}", *overrides])
        run = build_training(config, show_progress=False)
    loader = iter(run.trainer.get_train_dataloader())
    run.model.train()  # as the Trainer does (the teacher is not a submodule and stays in eval mode)
    return run.model, loader


def threading(method: str) -> contextlib.AbstractContextManager:
    """The `ops_threads` mode of an entry with an `@python` / `@openmp` suffix (none: the default)."""
    mode = method.partition("@")[2]
    return ops_threads(mode) if mode else contextlib.nullcontext()


def autocast(bf16: bool) -> torch.autocast:
    """The forward's precision: bf16 autocast as the Trainer runs it with `bf16: true` (on the CPU), else fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def one_pass(model, batch, clock=time.perf_counter, bf16: bool = False) -> float:
    """Seconds of one forward + backward on `clock` (wall: perf_counter; CPU: process_time)."""
    model.zero_grad(set_to_none=True)
    start = clock()
    with autocast(bf16):
        out = model(**batch)
    out["loss"].backward()
    return clock() - start


def peak_tensor_mib(model, batch, bf16: bool = False) -> float:
    """Peak torch tensor memory (MiB) of one forward + backward above what was live before it (NumPy buffers of
    numba kernels are not counted)."""
    from dwakd.evaluation.memory import peak_bytes

    model.zero_grad(set_to_none=True)

    def run() -> None:
        with autocast(bf16):
            loss = model(**batch)["loss"]
        loss.backward()

    _, peak = peak_bytes(run)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--methods", default="dwakd,cdm,alm,dskd")
    parser.add_argument("--batch-sizes", default="4,1")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (each method once per round)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (compilation, caches)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "method_steps.json"))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU seconds (with --threads 1, far less sensitive to other jobs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="also peak tensor memory of one pass per method")
    parser.add_argument("--bf16", action="store_true", help="forwards under bf16 autocast, as `training.bf16: true`")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if len(set(methods)) != len(methods):
        raise SystemExit("--methods: each entry once (rounds already interleave them)")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    config_name = os.path.relpath(args.config, ROOT) if Path(args.config).is_absolute() else args.config
    result = {"config": config_name, "overrides": args.overrides, "rounds": args.rounds, "warmup": args.warmup,
              "torch": torch.__version__, "machine": platform.platform(), "threads": torch.get_num_threads(),
              "clock": args.clock, "bf16": args.bf16, "command": " ".join(sys.argv), "load_before": os.getloadavg(),
              "results": {}}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        built = {m: build(args.config, m, batch_size, args.overrides) for m in methods}
        samples: dict[str, list[float]] = {m: [] for m in methods}
        for round_index in range(args.warmup + args.rounds):
            for method in methods:  # every method on its own next batch; all methods read the same data order
                model, loader = built[method]
                with threading(method):
                    seconds = one_pass(model, next(loader), clock, args.bf16)
                if round_index >= args.warmup:
                    samples[method].append(seconds)
        block = {}
        for method in methods:
            block[method] = {"samples": samples[method], "median_s": statistics.median(samples[method]),
                             "best_s": min(samples[method])}
        first = methods[0]
        for method in methods:
            block[method]["median_ratio_to_" + first] = block[method]["median_s"] / block[first]["median_s"]
            block[method]["best_ratio_to_" + first] = block[method]["best_s"] / block[first]["best_s"]
            # rounds feed every method the same batch: per-round ratios are paired (batch lengths cancel)
            paired = [x / y for x, y in zip(samples[method], samples[first], strict=True)]
            block[method]["paired_ratios_to_" + first] = paired
            block[method]["paired_median_ratio_to_" + first] = statistics.median(paired)
        if args.memory:
            for method in methods:
                model, loader = built[method]
                with threading(method):
                    block[method]["peak_tensor_mib"] = peak_tensor_mib(model, next(loader), args.bf16)
                block[method]["peak_ratio_to_" + first] = block[method]["peak_tensor_mib"] / block[first].get(
                    "peak_tensor_mib", block[method]["peak_tensor_mib"])
        result["results"][f"batch_{batch_size}"] = block
        print(f"batch {batch_size}: " + ", ".join(
            f"{m} median {block[m]['median_s']:.3f} s best {block[m]['best_s']:.3f} s" for m in methods), flush=True)
        del built
    result["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load average before {result['load_before']}, after {result['load_after']}; wrote {out}")


if __name__ == "__main__":
    main()
