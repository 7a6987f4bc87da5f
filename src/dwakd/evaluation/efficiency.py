"""Efficiency bench (paper Table 7): seconds per optimizer step and memory per method, same model pair and lengths.

For every (batch size, method) the run is built through the library (`dwakd.run.build_training`) from one
YAML config, with the method, batch size and step count overridden, and trained for `warmup + steps`
optimizer steps (no saving, no evaluation, gradient accumulation 1). Measured over the last `steps` steps:
- step time: wall clock from the trainer's `on_step_begin` to `on_step_end` (forward, backward, optimizer
  step; CUDA synchronised at both ends); the median is reported, all steps are kept in the JSON;
- memory on CUDA: peak = `torch.cuda.max_memory_allocated` over the measured steps, average = time-average of
  `torch.cuda.memory_allocated` sampled every `sample_interval` seconds by a background thread;
- memory on CPU: the process's resident set size (RSS), sampled the same way; peak = the largest sample
  (spikes shorter than the interval can be missed). RSS covers the whole process (libraries, both models,
  data), so differences between methods are smaller than on a GPU.
Memory is reported in GiB (2**30 bytes). A method that fails to build or train is reported with its error.

With `profile_steps > 0` that many further steps run after the measured ones under `torch.profiler` (CPU, and
CUDA on a GPU) and their operator table — self CPU time first, then CUDA time — is written next to the results
(`profile_<method>_bs<batch>.txt`): what a step spends where, host-side stalls included, without touching the
timed steps.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
GIB = 2**30


@dataclass
class BenchResult:
    """One (method, batch size) measurement."""

    method: str
    batch_size: int
    device: str = ""
    memory_kind: str = ""  # "cuda_allocated" or "process_rss"
    step_seconds: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    avg_mem_gib: float | None = None
    peak_mem_gib: float | None = None
    error: str | None = None
    profile: str | None = None  # path of the operator table of the profiled steps, if any


class MemorySampler:
    """Background thread sampling a memory reading (bytes) every `interval` seconds while active."""

    def __init__(self, read: Callable[[], int], interval: float = 0.01):
        self.read, self.interval = read, interval
        self.samples: list[int] = []
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._active.is_set():
                self.samples.append(self.read())
            time.sleep(self.interval)

    def start(self) -> None:
        self._thread.start()

    def activate(self) -> None:
        self._active.set()

    def close(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _rss_bytes() -> int:
    import psutil  # a dependency of accelerate, which transformers' Trainer needs

    return psutil.Process().memory_info().rss


class StepTimer(TrainerCallback):
    """Times optimizer steps and starts memory sampling once the warm-up steps are over; optionally profiles
    `profile_steps` steps after the `steps` measured ones (kept out of the timings and the memory readings)."""

    def __init__(self, warmup: int, cuda: bool, sampler: MemorySampler, steps: int, profile_steps: int = 0):
        self.warmup, self.cuda, self.sampler = warmup, cuda, sampler
        self.measured_end = warmup + steps  # steps from here on are not measured
        self.profile_steps = profile_steps
        self.seconds: list[float] = []
        self.step_end_bytes: list[int] = []
        self.profiler: torch.profiler.profile | None = None
        self.profiled = 0
        self._started = 0.0
        self._step = 0

    def _measuring(self) -> bool:
        return self.warmup <= self._step < self.measured_end

    def on_step_begin(self, args, state, control, **kwargs):
        if self._step == self.warmup:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.sampler.activate()
        if self._step == self.measured_end:
            self.sampler.close()  # the readings cover the measured steps only
            if self.profile_steps and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
        if self.cuda:
            torch.cuda.synchronize()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._started
        if self._measuring():
            self.seconds.append(elapsed)
            self.step_end_bytes.append(self.sampler.read())
        elif self.profiler is not None and self.profiled < self.profile_steps:
            self.profiled += 1
            if self.profiled == self.profile_steps:
                self.profiler.__exit__(None, None, None)
        self._step += 1

    def close(self) -> None:
        """Stop a profiler that training ended before it finished (too few steps)."""
        if self.profiler is not None and self.profiled < self.profile_steps:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def profile_table(self, rows: int = 40) -> str | None:
        """The profiled steps' operators by self CPU time (and by CUDA time on a GPU), or None if none ran."""
        if self.profiler is None or self.profiled < self.profile_steps:
            return None
        events = self.profiler.key_averages()
        tables = [f"{self.profiled} profiled step(s) after the measured ones\n\nby self CPU time:\n",
                  events.table(sort_by="self_cpu_time_total", row_limit=rows)]
        if self.cuda:
            tables += ["\nby CUDA time:\n", events.table(sort_by="cuda_time_total", row_limit=rows)]
        return "".join(tables)


def bench_one(tree: dict, method: str, batch_size: int, *, warmup: int = 3, steps: int = 10,
              sample_interval: float = 0.01, work_dir: str | Path | None = None, profile_steps: int = 0,
              profile_dir: str | Path | None = None) -> BenchResult:
    """Build the run for `method` at `batch_size` from config `tree` and measure `steps` steps after `warmup`;
    then profile `profile_steps` more and write their operator table to `profile_dir` (default: `work_dir`)."""
    from dwakd.config import apply_overrides, config_from_dict
    from dwakd.run import build_training

    result = BenchResult(method, batch_size)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="dwakd-bench-"))
    overrides = [
        f"method.name={method}", "method.options={}", f"training.max_steps={warmup + steps + profile_steps}",
        f"training.per_device_train_batch_size={batch_size}", "training.gradient_accumulation_steps=1",
        "training.save_strategy='no'", "training.eval_strategy='no'", "training.logging_steps=1000000",
        "training.report_to=none", "training.disable_tqdm=true", f"training.output_dir={work_dir / method}",
        f"data.max_train_examples={batch_size * (warmup + steps + profile_steps)}",
    ]
    sampler = None
    try:
        config = config_from_dict(apply_overrides(copy.deepcopy(tree), overrides), f"bench[{method}]")
        run = build_training(config, show_progress=False)
        device = run.trainer.args.device
        cuda = device.type == "cuda"
        result.device = str(torch.cuda.get_device_name(device) if cuda else "cpu")
        result.memory_kind = "cuda_allocated" if cuda else "process_rss"
        sampler = MemorySampler((lambda: torch.cuda.memory_allocated(device)) if cuda else _rss_bytes,
                                sample_interval)
        timer = StepTimer(warmup, cuda, sampler, steps, profile_steps)
        run.trainer.add_callback(timer)
        sampler.start()
        run.trainer.train()
        timer.close()
        sampler.close()
        if len(timer.seconds) < steps:
            raise RuntimeError(f"only {len(timer.seconds)} measured steps (dataset too small for {steps})")
        table = timer.profile_table()
        if table is not None:
            path = Path(profile_dir or work_dir) / f"profile_{method}_bs{batch_size}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table, encoding="utf-8")
            result.profile = str(path)
        result.step_seconds = timer.seconds
        result.median_step_s = statistics.median(timer.seconds)
        readings = sampler.samples + timer.step_end_bytes
        result.avg_mem_gib = statistics.fmean(sampler.samples or timer.step_end_bytes) / GIB
        result.peak_mem_gib = (torch.cuda.max_memory_allocated(device) if cuda else max(readings)) / GIB
    except Exception as exc:  # one failing method must not stop the bench; the table shows the error
        logger.warning("bench %s (batch %d) failed: %s", method, batch_size, exc)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if sampler is not None:
            sampler.close()
        run = None  # drop the models before the next method is built
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run_bench(tree: dict, methods: Sequence[str], batch_sizes: Sequence[int] = (4, 1), *, warmup: int = 3,
              steps: int = 10, sample_interval: float = 0.01, profile_steps: int = 0,
              profile_dir: str | Path | None = None) -> list[BenchResult]:
    """Bench every method at every batch size (same config, so the same model pair and lengths)."""
    if warmup < 0 or steps < 1 or profile_steps < 0:
        raise ValueError("need warmup >= 0, steps >= 1 and profile steps >= 0")
    with tempfile.TemporaryDirectory(prefix="dwakd-bench-") as work_dir:
        return [bench_one(tree, m, b, warmup=warmup, steps=steps, sample_interval=sample_interval,
                          work_dir=work_dir, profile_steps=profile_steps, profile_dir=profile_dir)
                for b in batch_sizes for m in methods]


def bench_markdown(results: Sequence[BenchResult]) -> str:
    """Table like paper Table 7: one block per batch size; Avg/Peak memory (GiB) and median step time (s)."""
    lines = ["| Method | Avg Mem (GiB) | Peak Mem (GiB) | Step time (s) |", "|---|---:|---:|---:|"]
    for batch_size in dict.fromkeys(r.batch_size for r in results):
        block = [r for r in results if r.batch_size == batch_size]
        kinds = {r.memory_kind for r in block if r.memory_kind}
        note = " (process RSS)" if kinds == {"process_rss"} else ""
        lines.append(f"| *Batch size {batch_size}*{note} | | | |")
        for r in block:
            if r.error:
                lines.append(f"| {r.method} | failed: {r.error[:80]} | | |")
            else:
                lines.append(f"| {r.method} | {r.avg_mem_gib:.3f} | {r.peak_mem_gib:.3f} | {r.median_step_s:.3f} |")
    return "\n".join(lines) + "\n"


def write_bench(results: Sequence[BenchResult], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """bench.json (every measured step) and bench.md (the table)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    paths["json"].write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2), encoding="utf-8")
    paths["markdown"].write_text(bench_markdown(results), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `dwakd bench`."""
    p = subparsers.add_parser(
        "bench", help="seconds per optimizer step and memory per method (paper Table 7)",
        description="For each method and batch size, build the run from CONFIG (same model pair and lengths) "
                    "and time optimizer steps after a warm-up; memory from CUDA allocator stats or process RSS.")
    p.add_argument("config", help="YAML config naming the model pair and data, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.max_length=..., ...)")
    p.add_argument("--methods", nargs="+", help="default: every registered method")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 1])
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before measuring")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps (median reported)")
    p.add_argument("--sample-interval", type=float, default=0.01, help="memory sampling period in seconds")
    p.add_argument("--out-dir", default="runs/bench", help="where the runs and the results JSON go")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="steps to profile after the measured ones (torch.profiler operator tables in OUT_DIR)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import sys

    import yaml

    from dwakd.config import ConfigError, apply_overrides, config_from_dict
    from dwakd.methods import method_names

    try:
        tree = yaml.safe_load(Path(args.config).read_text()) or {}
        tree = apply_overrides(tree, args.overrides)
        config_from_dict(tree, args.config)  # fail fast on a bad config
        methods = args.methods or method_names()
        results = run_bench(tree, methods, args.batch_sizes, warmup=args.warmup, steps=args.steps,
                            sample_interval=args.sample_interval, profile_steps=args.profile_steps,
                            profile_dir=args.out_dir)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"dwakd bench: error: {exc}", file=sys.stderr)
        return 2
    data = tree.get("data", {})
    meta = {"config": args.config, "overrides": args.overrides, "warmup": args.warmup, "steps": args.steps,
            "profile_steps": args.profile_steps,
            "max_prompt_length": data.get("max_prompt_length"), "max_length": data.get("max_length")}
    paths = write_bench(results, args.out_dir, meta)
    device = next((r.device for r in results if r.device), "?")
    print(f"{args.steps} steps after {args.warmup} warm-up per method; device {device}; "
          f"lengths: prompt ≤ {meta['max_prompt_length']}, total ≤ {meta['max_length']}")
    print(bench_markdown(results), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(r.error is None for r in results) else 1
