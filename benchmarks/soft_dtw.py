"""Benchmark: Soft-DTW forward+backward of dwakd's fast path against every installable peer, on the same costs.

Every implementation receives the *same* precomputed (batch, N, M) cosine-cost tensor (requires_grad) and is timed
on `value.sum().backward()` (forward + backward + the framework glue each one needs, through each one's public
autograd function). Rounds are interleaved across implementations so background load hits all of them alike
(`--schedule blocked`: all rounds of one implementation back to back instead, which keeps its caches, buffers and
threads warm and separates the kernel from what the interleaving costs it); medians and best-of-N are reported,
ratios are measured in the same run, and the load average is recorded before and after every configuration.
Accuracy: each implementation's values and gradients against a float64 reference computed on the same costs
(dwakd's float64 CPU path, itself checked against the plain-PyTorch reference by the unit tests and, here, on every
configuration with N ≤ --torch-ref-max-len).

`--divergence` times the Soft-DTW divergence D = sdtw(C_xy) − ½(sdtw(C_xx) + sdtw(C_yy)) of (batch, N, --dim)
sequences instead, backward to both inputs: dwakd's `soft_dtw_divergence` (one call, the self terms on half grids)
against each peer run on the three cosine-cost batches from the same `cosine_cost` (so only the DPs differ).

Peers (optional, `pip install tslearn pysdtw ddtw dtw-loss-functions toml`): tslearn, pysdtw, ddtw (numba CPU /
CUDA C++), dtw-loss-functions (Maghoumi's numba CPU/CUDA "mag", BGU's "ron"). Missing peers are recorded, not fatal.

    PYTHONPATH=src python benchmarks/soft_dtw.py                 # quick grid on CPU (a few minutes)
    PYTHONPATH=src python benchmarks/soft_dtw.py --grid full     # B ∈ {4,8,32}, N=M ∈ {128..1024}, γ ∈ {1,.1,.01}
    PYTHONPATH=src python benchmarks/soft_dtw.py --configs 8,256,0.1 --repeats 31 --divergence  # one divergence
    PYTHONPATH=src python benchmarks/soft_dtw.py --device cuda   # ours = impl="cuda" (Triton); GPU peers

Writes benchmarks/results/soft_dtw_<device>.json and .png (or --out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dwakd.ops._threads import ops_threads  # noqa: E402
from dwakd.ops.soft_dtw import cosine_cost, soft_dtw, soft_dtw_divergence  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_GRID = [(b, n, g) for b, n, g in itertools.product((4, 8), (128, 256), (1.0, 0.1, 0.01))] + [(8, 512, 0.1)]
FULL_GRID = list(itertools.product((4, 8, 32), (128, 256, 512, 1024), (1.0, 0.1, 0.01)))
HEADLINE = {"cpu": (8, 256, 0.1), "cuda": (8, 512, 0.1)}
PYTHON_THREADS = "dwakd:python-threads"  # dwakd's CPU path with DWAKD_OPS_THREADS=python

# An implementation maps leaf inputs (a cost (batch, N, M), or the sequences x, y of the divergence) to a scalar whose
# backward gives d(Σ_b value_b)/d inputs, and the per-sample values it computed (or their mean, flagged by
# `mean_only`) for the accuracy check.
Runner = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Impl:
    """One timed implementation: how to build its runner for γ, and its known limits."""

    name: str
    package: str
    make: Callable[[float], Runner]
    mean_only: bool = False  # reports only the batch mean (its runner back-propagates mean·B, i.e. the sum)
    max_len: int | None = None  # longest sequence it supports
    note: str = ""


def _version(package: str) -> str | None:
    """Installed version of a distribution (for dwakd run from a checkout: the git commit), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package != "dwakd":
            return None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent)  # fmt: skip
        return f"git {head.stdout.strip()}"
    except (OSError, subprocess.CalledProcessError):
        return None


def _per_sample(fn: Callable[..., torch.Tensor], inputs: int = 1) -> Runner:
    """Runner for implementations returning (batch,) values (of one cost, or of `inputs` tensors)."""

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert len(tensors) == inputs
        values = fn(*tensors)
        return values.sum(), values

    return run


def _python_threads(runner: Runner) -> Runner:
    """`runner` with dwakd's CPU kernels on a pool of Python threads instead of torch's OpenMP team."""

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with ops_threads("python"):
            return runner(*tensors)

    return run


def divergence_impl(impl: Impl) -> Impl:
    """The divergence through `impl`: dwakd's own function, or a peer on the three cosine-cost batches."""
    if impl.name.startswith("dwakd"):
        path = "cuda" if "Triton" in impl.note else "cpu"
        wrap = _python_threads if impl.name == PYTHON_THREADS else (lambda runner: runner)
        return Impl(impl.name, impl.package,
                    lambda g: wrap(_per_sample(lambda x, y: soft_dtw_divergence(x, y, g, impl=path), inputs=2)),
                    note=f"soft_dtw_divergence impl={path!r}; {impl.note}")  # fmt: skip

    def make(g: float) -> Runner:
        run = impl.make(g)

        def divergence(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            (cross_total, cross), (sx_total, sx), (sy_total, sy) = (
                run(cosine_cost(a, b)) for a, b in ((x, y), (x, x), (y, y))
            )
            return cross_total - 0.5 * (sx_total + sy_total), cross - 0.5 * (sx + sy)

        return divergence

    return Impl(impl.name, impl.package, make, mean_only=impl.mean_only, max_len=impl.max_len,
                note=f"{impl.note}; 3 calls on dwakd.cosine_cost")  # fmt: skip


def cpu_impls() -> tuple[list[Impl], dict[str, str]]:
    """dwakd's CPU path and every CPU peer that imports; the second value maps missing peers to the reason."""
    impls = [
        Impl("dwakd", "dwakd", lambda g: _per_sample(lambda c: soft_dtw(c, g, impl="cpu")), note="numba, float32"),
        # the same kernels on Python threads, which torch's spinning OpenMP workers keep waiting (ops._threads)
        Impl(PYTHON_THREADS, "dwakd", lambda g: _python_threads(_per_sample(lambda c: soft_dtw(c, g, impl="cpu"))),
             note="numba, float32, Python threads"),  # fmt: skip
    ]
    missing: dict[str, str] = {}
    try:
        from tslearn.metrics.soft_dtw_loss_pytorch import _SoftDTWLossPyTorch

        impls.append(Impl("tslearn", "tslearn", lambda g: _per_sample(lambda c: _SoftDTWLossPyTorch.apply(c, g)),
                          note="numba prange over batch, input dtype"))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the benchmark
        missing["tslearn"] = repr(exc)
    try:
        from pysdtw.sdtw_cpu import SoftDTWcpu

        def pysdtw_cpu(g: float) -> Runner:
            def fn(c: torch.Tensor) -> torch.Tensor:
                lengths = torch.tensor([[c.shape[1], c.shape[2]]] * c.shape[0])
                return SoftDTWcpu.apply(c, lengths, g, 0.0)

            return _per_sample(fn)

        impls.append(Impl("pysdtw", "pysdtw", pysdtw_cpu, note="numba prange over batch, float64"))
    except Exception as exc:  # noqa: BLE001
        missing["pysdtw"] = repr(exc)
    try:
        from ddtw import dDTW

        def ddtw_cpu(g: float) -> Runner:
            module = dDTW(min_function="softmin", gamma=g, normalization="none", backend="cpu_numba")

            def run(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                mean = module(C=c)
                return mean * c.shape[0], mean

            return run

        impls.append(Impl("ddtw", "ddtw", ddtw_cpu, mean_only=True, note="numba, stores softmin grads"))
    except Exception as exc:  # noqa: BLE001
        missing["ddtw"] = repr(exc)
    try:
        from dtw_loss_functions.soft_dtw_implementations.soft_dtw_cuda_mag import _SoftDTW as MagCPU

        impls.append(Impl("dtw-loss-functions:mag", "dtw-loss-functions",
                          lambda g: _per_sample(lambda c: MagCPU.apply(c, g, 0)),
                          note="Maghoumi numba CPU"))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        missing["dtw-loss-functions:mag"] = repr(exc)
    try:
        from dtw_loss_functions.soft_dtw_implementations.soft_dtw_cuda_ron.autograd import SoftDTWAutograd

        impls.append(Impl("dtw-loss-functions:ron", "dtw-loss-functions",
                          lambda g: _per_sample(lambda c: SoftDTWAutograd.apply(c, g, None)),
                          note="BGU numba CPU"))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        missing["dtw-loss-functions:ron"] = repr(exc)
    return impls, missing


def cuda_impls() -> tuple[list[Impl], dict[str, str]]:
    """GPU peers and dwakd's options on CUDA tensors. Written without a GPU: adapters follow each peer's API."""
    impls = [
        Impl("dwakd", "dwakd", lambda g: _per_sample(lambda c: soft_dtw(c, g, impl="cuda")),
             note="Triton kernels, float32"),  # fmt: skip
        Impl("dwakd:cpu-offload", "dwakd", lambda g: _per_sample(lambda c: soft_dtw(c, g, impl="cpu")),
             note="host copy + numba"),  # fmt: skip
    ]
    missing: dict[str, str] = {}
    try:
        from pysdtw.sdtw_cuda import SoftDTWcuda

        def pysdtw_cuda(g: float) -> Runner:
            def fn(c: torch.Tensor) -> torch.Tensor:
                lengths = torch.tensor([[c.shape[1], c.shape[2]]] * c.shape[0], device=c.device)
                return SoftDTWcuda.apply(c, lengths, g, 0.0)

            return _per_sample(fn)

        impls.append(Impl("pysdtw", "pysdtw", pysdtw_cuda, max_len=1024, note="numba CUDA"))
    except Exception as exc:  # noqa: BLE001
        missing["pysdtw"] = repr(exc)
    try:
        from dtw_loss_functions.soft_dtw_implementations.soft_dtw_cuda_mag import _SoftDTWCUDA

        impls.append(Impl("dtw-loss-functions:mag", "dtw-loss-functions",
                          lambda g: _per_sample(lambda c: _SoftDTWCUDA.apply(c, g, 0)), max_len=1024,
                          note="Maghoumi numba CUDA (bundled)"))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        missing["dtw-loss-functions:mag"] = repr(exc)
    try:
        from dtw_loss_functions.soft_dtw_implementations.soft_dtw_cuda_ron.autograd import SoftDTWAutograd

        impls.append(Impl("dtw-loss-functions:ron", "dtw-loss-functions",
                          lambda g: _per_sample(lambda c: SoftDTWAutograd.apply(c, g, None)),
                          note="BGU numba CUDA"))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        missing["dtw-loss-functions:ron"] = repr(exc)
    try:
        from ddtw import dDTW

        def ddtw_cuda(g: float) -> Runner:
            module = dDTW(min_function="softmin", gamma=g, normalization="none", backend="cuda_cpp")

            def run(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                mean = module(C=c)
                return mean * c.shape[0], mean

            return run

        impls.append(Impl("ddtw", "ddtw", ddtw_cuda, mean_only=True, note="CUDA C++ extension"))
    except Exception as exc:  # noqa: BLE001
        missing["ddtw"] = repr(exc)
    return impls, missing


def make_sequences(batch: int, length: int, seed: int, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (batch, N, dim) float32 smooth random sequences (neighbouring states correlated, as in LMs), y ≈ x."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(batch, length, dim, generator=gen)
    x = torch.cumsum(steps, dim=1) / math.sqrt(length) + 0.5 * torch.randn(batch, length, dim, generator=gen)
    y = x + 0.3 * torch.randn(batch, length, dim, generator=gen)
    return x, y


def make_costs(batch: int, length: int, device: str, seed: int, dim: int = 64) -> torch.Tensor:
    """(batch, N, N) float32 cosine costs of `make_sequences`."""
    x, y = make_sequences(batch, length, seed, dim)
    return cosine_cost(x, y).to(device).contiguous()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(runner: Runner, inputs: tuple[torch.Tensor, ...], device: str) -> tuple[float, torch.Tensor, tuple]:
    """Seconds for forward+backward (on CUDA: between two events on the stream, host launch gaps included), the
    values and the gradients w.r.t. every input. Leaf copies are made outside the timed region."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    _sync(device)
    if device == "cuda":
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        total, values = runner(*leaves)
        total.backward()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) / 1e3, values.detach(), tuple(t.grad for t in leaves)
    start = time.perf_counter()
    total, values = runner(*leaves)
    total.backward()
    _sync(device)
    return time.perf_counter() - start, values.detach(), tuple(t.grad for t in leaves)


def float64_reference(
    inputs: tuple[torch.Tensor, ...], gamma: float, torch_ref_max_len: int, divergence: bool
) -> tuple[torch.Tensor, tuple, dict]:
    """Values and gradients in float64 (dwakd CPU float64 path), cross-checked against the PyTorch reference."""

    def run(impl: str) -> tuple[torch.Tensor, tuple]:
        leaves = tuple(t.detach().double().cpu().requires_grad_(True) for t in inputs)
        values = soft_dtw_divergence(*leaves, gamma, impl=impl) if divergence else soft_dtw(*leaves, gamma, impl=impl)
        values.sum().backward()
        return values.detach(), tuple(t.grad for t in leaves)

    values, grads = run("cpu")
    check: dict = {"reference": "dwakd cpu float64"}
    if inputs[0].shape[1] <= torch_ref_max_len:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny ops: OpenMP hand-offs would dominate
        try:
            ref_values, ref_grads = run("reference")
        finally:
            torch.set_num_threads(threads)
        check["vs_torch_reference_value_abs"] = float((ref_values - values).abs().max())
        check["vs_torch_reference_grad_abs"] = max(float((a - b).abs().max()) for a, b in zip(ref_grads, grads))
    return values, grads, check


def bench_config(impls: list[Impl], batch: int, length: int, gamma: float, args, first_call: dict) -> dict:
    """Time every implementation on one (batch, N=M, γ) configuration; accuracy against float64."""
    seed = batch * 100003 + length
    if args.divergence:
        inputs = tuple(t.to(args.device) for t in make_sequences(batch, length, seed, args.dim))
    else:
        inputs = (make_costs(batch, length, args.device, seed=seed),)
    entry: dict = {"batch": batch, "n": length, "m": length, "gamma": gamma, "impls": {},
                   "load_average_before": _load()}  # fmt: skip
    if args.divergence:
        entry["dim"] = args.dim
    ref_values, ref_grads, check = float64_reference(inputs, gamma, args.torch_ref_max_len, args.divergence)
    entry["accuracy_reference"] = check
    entry["latency_steps"] = 2 * (2 * length - 1)  # dependent anti-diagonal steps of forward + backward
    runners: dict[str, Runner] = {}
    for impl in impls:
        record: dict = {"package": impl.package, "note": impl.note}
        entry["impls"][impl.name] = record
        if impl.max_len is not None and length > impl.max_len:
            record["error"] = f"unsupported: length > {impl.max_len}"
            continue
        try:
            runner = impl.make(gamma)
            seconds, values, grads = run_once(runner, inputs, args.device)  # warm-up (first call compiles)
            first_call.setdefault(impl.name, seconds)
            for _ in range(args.warmup - 1):
                run_once(runner, inputs, args.device)
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"{type(exc).__name__}: {exc}"
            if args.verbose:
                traceback.print_exc()
            continue
        want = ref_values.mean() if impl.mean_only else ref_values
        got = values.double().cpu()
        record["value_max_rel_err"] = float(((got - want).abs() / want.abs().clamp_min(1e-12)).max())
        # runners back-propagate the batch sum, so gradients compare directly
        record["grad_max_abs_err"] = max(float((g.double().cpu() - r).abs().max()) for g, r in zip(grads, ref_grads))
        record["finite"] = bool(torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in grads))
        record["times_s"] = []
        runners[impl.name] = runner
    if args.schedule == "blocked":  # every repeat of one implementation back to back, then the next
        for name, runner in runners.items():
            for _ in range(args.repeats):
                seconds, _, _ = run_once(runner, inputs, args.device)
                entry["impls"][name]["times_s"].append(seconds)
    else:
        for _ in range(args.repeats):  # interleaved rounds
            for name, runner in runners.items():
                seconds, _, _ = run_once(runner, inputs, args.device)
                entry["impls"][name]["times_s"].append(seconds)
    entry["schedule"] = args.schedule
    entry["load_average_after"] = _load()
    for name in runners:
        record = entry["impls"][name]
        record["median_s"] = statistics.median(record["times_s"])
        record["min_s"] = min(record["times_s"])
    ours = entry["impls"].get(args.ours, {})
    if "median_s" in ours:
        for name in runners:
            record = entry["impls"][name]
            record["ours_over_peer"] = ours["median_s"] / record["median_s"]
            record["speedup_of_ours"] = record["median_s"] / ours["median_s"]
            record["speedup_of_ours_best"] = record["min_s"] / ours["min_s"]  # best-of-N, less sensitive to load
    return entry


def _load() -> list[float] | None:
    """1-, 5- and 15-minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def print_table(results: dict, ours: str) -> None:
    """One line per configuration: our median time, then each peer's median and ours/peer (×speed-up)."""
    names = [n for n in results["impl_names"] if n != ours]
    gpu = results["device"] == "cuda"
    steps = f"{'ns/step':>8} | " if gpu else ""  # time per step of the 2·(2N − 1)-step latency bound
    what = "divergence (backward to x and y)" if results.get("divergence") else "forward + sum().backward()"
    print(f"\n{what}, {results.get('threads', '?')} threads")
    print(f"{'B':>3} {'N':>5} {'γ':>5} | {'load 1-min':>11} | {ours + ' ms':>14} | {steps}"
          + " | ".join(f"{n[:26]:>26}" for n in names))  # fmt: skip
    print("-" * (50 + 11 * gpu + 29 * len(names)))
    for entry in results["configs"]:
        impls = entry["impls"]
        mine = impls.get(ours, {})
        head = f"{entry['batch']:>3} {entry['n']:>5} {entry['gamma']:>5} | "
        before, after = entry.get("load_average_before"), entry.get("load_average_after")
        head += f"{before[0]:>5.1f}→{after[0]:<5.1f} | " if before and after else f"{'n/a':>11} | "
        head += (f"{mine['median_s'] * 1e3:>6.2f} ({mine['min_s'] * 1e3:>5.2f}) | " if "median_s" in mine
                 else f"{'n/a':>14} | ")  # fmt: skip
        if gpu:
            n_steps = 2 * (2 * entry["n"] - 1)
            head += f"{mine['median_s'] * 1e9 / n_steps:>8.0f} | " if "median_s" in mine else f"{'n/a':>8} | "
        cells = []
        for n in names:
            rec = impls.get(n, {})
            if "median_s" in rec and "median_s" in mine:
                best = rec["min_s"] / mine["min_s"]
                cells.append(f"{rec['median_s'] * 1e3:7.1f}ms {rec['ours_over_peer']:.3f} "
                             f"{rec['speedup_of_ours']:.0f}x|{best:.0f}x")  # fmt: skip
            else:
                cells.append(f"{'—':>26}")
        print(head + " | ".join(f"{c:>26}" for c in cells))
    print(f"\n{ours} ms: median (best-of-N); cells: peer median ms, ours/peer (medians), speed-up of {ours} on "
          "medians|on best-of-N; load: 1-minute load average before → after the configuration; accuracy and all "
          "samples in the JSON")  # fmt: skip
    if gpu:
        print("ns/step: our median over the 2·(2N − 1) dependent anti-diagonal steps of forward + backward (the "
              "latency bound: no implementation can take fewer sequential steps)")  # fmt: skip


def plot(results: dict, path: Path, ours: str) -> None:
    """Left: median time vs N at the headline batch and γ; right: speed-up of ours over each peer, all configs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch, _, gamma = HEADLINE[results["device"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in results["impl_names"]:
        pts = [(e["n"], e["impls"][name]["median_s"] * 1e3) for e in results["configs"]
               if e["batch"] == batch and e["gamma"] == gamma and "median_s" in e["impls"].get(name, {})]  # fmt: skip
        if pts:
            xs, ys = zip(*sorted(pts))
            ax1.plot(xs, ys, marker="o", label=name, linewidth=2.5 if name == ours else 1.2)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("N = M")
    ax1.set_ylabel("forward + backward, median ms")
    ax1.set_title(f"Soft-DTW on {results['device']}: B={batch}, γ={gamma}")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    peers = [n for n in results["impl_names"] if n != ours]
    labels = [f"B{e['batch']} N{e['n']} γ{e['gamma']}" for e in results["configs"]]
    width = 0.8 / max(1, len(peers))
    for k, name in enumerate(peers):
        ys = [e["impls"].get(name, {}).get("speedup_of_ours", float("nan")) for e in results["configs"]]
        ax2.bar([i + k * width for i in range(len(ys))], ys, width=width, label=name)
    ax2.set_yscale("log")
    ax2.axhline(5 if results["device"] == "cpu" else 10, color="k", linestyle="--", linewidth=1, label="goal")
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax2.set_xticklabels(labels, rotation=70, fontsize=7)
    ax2.set_ylabel(f"speed-up of {ours} (peer / ours)")
    ax2.grid(True, axis="y", which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info(device: str) -> dict:
    """What the numbers were measured on."""
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        # the vector width the kernels get (AVX2: 8 float32 lanes, AVX-512: 16) decides our speed, not the peers'
        info["vector_isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> dict:
    """Run the grid, write JSON + PNG, print the ratio table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("quick", "full"), default="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation and configuration")
    parser.add_argument("--torch-ref-max-len", type=int, default=256, help="cross-check float64 vs torch reference")
    parser.add_argument("--only", nargs="*", help="restrict to these implementation names")
    parser.add_argument("--configs", nargs="*", help="explicit B,N,gamma triples instead of a grid, e.g. 8,256,0.1")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG next to it)")
    parser.add_argument("--divergence", action="store_true", help="time the divergence of sequences, not soft_dtw")
    parser.add_argument("--dim", type=int, default=64, help="feature size of the divergence's sequences")
    parser.add_argument("--threads", type=int, default=2, help="torch and numba threads (every implementation)")
    parser.add_argument("--schedule", choices=("interleaved", "blocked"), default="interleaved",
                        help="interleaved: one call of each implementation per round (load hits all alike); blocked: "
                             "all rounds of one implementation back to back (its caches and threads stay warm)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--replot", type=Path, help="re-print the table and redraw the PNG of an existing JSON")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        ours = "dwakd"
        plot(results, args.replot.with_suffix(".png"), ours)
        print_table(results, ours)
        return results
    args.ours = "dwakd"  # on CUDA: impl="cuda", the Triton kernels
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")

    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    impls, missing = cpu_impls() if args.device == "cpu" else cuda_impls()
    if args.only:
        impls = [i for i in impls if i.name in args.only or i.name == args.ours]
    if args.divergence:
        impls = [divergence_impl(i) for i in impls]
    grid = QUICK_GRID if args.grid == "quick" else FULL_GRID
    if args.configs:
        grid = [(int(b), int(n), float(g)) for b, n, g in (c.split(",") for c in args.configs)]
    results: dict = {
        "device": args.device,
        "grid": args.grid,
        "machine": machine_info(args.device),
        "impl_names": [i.name for i in impls],
        "versions": {i.name: _version(i.package) for i in impls},
        "missing_peers": missing,
        "repeats": args.repeats,
        "threads": args.threads,
        "divergence": args.divergence,
        "command": " ".join(["python", *sys.argv]),
        "configs": [],
    }
    print(f"implementations: {results['impl_names']}; missing: {list(missing)}", flush=True)
    first_call: dict[str, float] = {}
    for batch, length, gamma in grid:
        started = time.perf_counter()
        entry = bench_config(impls, batch, length, gamma, args, first_call)
        results["configs"].append(entry)
        mine = entry["impls"].get(args.ours, {}).get("median_s")
        print(f"B={batch} N={length} γ={gamma}: ours {mine * 1e3 if mine else float('nan'):.2f} ms "
              f"({time.perf_counter() - started:.0f}s)", flush=True)  # fmt: skip
    results["first_call_s"] = first_call
    suffix = "_divergence" if args.divergence else ""
    out = args.out or RESULTS / f"soft_dtw_{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if len(grid) > 1:
        plot(results, out.with_suffix(".png"), args.ours)
    print_table(results, args.ours)
    print(f"first call (compile or cache load + run), s: { {k: round(v, 2) for k, v in first_call.items()} }")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
