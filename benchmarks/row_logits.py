"""Benchmark: LM heads at label rows only (`ModelView.logits_at`) vs dense logits at every position.

For each method, builds the run exactly as `dwakd train` does (config + overrides), takes real training batches,
and times forward + backward of the `DistillationModel` with `row_logits` on and off, interleaved round by round
so background load hits both alike. On CUDA it also records the peak allocated memory of each pass.

    PYTHONPATH=src python benchmarks/row_logits.py                                  # tiny recipe, sft/dskd/dwakd
    PYTHONPATH=src python benchmarks/row_logits.py --methods dskd --rounds 9 data.max_length=256
    PYTHONPATH=src python benchmarks/row_logits.py --config configs/paper/qwen1.5-1.8b_gpt2-120m-dskd.yaml --device cuda

Writes benchmarks/results/row_logits.json (or --out): every sample, medians and the ratio dense/rows per method.
"""

from __future__ import annotations

import argparse
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
from dwakd.run import build_training  # noqa: E402


def one_pass(model, batch, row_logits: bool, device: torch.device, bf16: bool = False) -> tuple[float, int | None]:
    """(seconds, peak CUDA bytes or None) of one forward + backward (under bf16 autocast when the config asks)."""
    model.row_logits = row_logits
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch)
    out["loss"].backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return seconds, peak


def bench_method(config_path: str, method: str, overrides: list[str], rounds: int, batches: int,
                 device: torch.device) -> dict:
    """Interleaved dense/rows timings of one method on `batches` real batches."""
    with tempfile.TemporaryDirectory() as out_dir:
        config = load_config(config_path, [f"method={method}", f"output_dir={out_dir}", "data.eval=null",
                                           "training.max_steps=1", *overrides])
        run = build_training(config, show_progress=False)
    model = run.model.to(device)
    if model.teacher is not None:
        model.teacher.to(device)
    model.train()
    loader = iter(run.trainer.get_train_dataloader())
    # tensors to the device; other collated fields (lists of per-example metadata) stay as they are
    data = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in next(loader).items()} for _ in range(batches)]
    samples: dict[str, list[float]] = {"dense": [], "rows": []}
    peaks: dict[str, list[int]] = {"dense": [], "rows": []}
    bf16 = bool(run.trainer.args.bf16)
    one_pass(model, data[0], True, device, bf16)  # warm-up (also the one-time head check)
    one_pass(model, data[0], False, device, bf16)
    for r in range(rounds):
        for mode in (("dense", "rows") if r % 2 == 0 else ("rows", "dense")):
            for batch in data:
                seconds, peak = one_pass(model, batch, mode == "rows", device, bf16)
                samples[mode].append(seconds)
                if peak is not None:
                    peaks[mode].append(peak)
    labels = [int(b["labels"].ne(-100).sum()) for b in data]
    tokens = [int(b["labels"].numel()) for b in data]
    result = {
        "head_deferred": {k: v for k, v in model._head_checked.items()},
        "label_fraction_student": sum(labels) / sum(tokens),
        "median_s": {k: statistics.median(v) for k, v in samples.items()},
        "best_s": {k: min(v) for k, v in samples.items()},  # robust to load spikes on a shared machine
        "samples_s": samples,
    }
    result["speedup_dense_over_rows"] = result["median_s"]["dense"] / result["median_s"]["rows"]
    result["speedup_best_of_n"] = result["best_s"]["dense"] / result["best_s"]["rows"]
    if peaks["rows"]:
        result["peak_bytes"] = {k: max(v) for k, v in peaks.items()}
        result["memory_ratio_rows_over_dense"] = result["peak_bytes"]["rows"] / result["peak_bytes"]["dense"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--methods", default="sft,dskd,dwakd")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "row_logits.json"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_average_start": os.getloadavg(), "torch_threads": torch.get_num_threads(),
                                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
                    "config": args.config, "overrides": args.overrides, "rounds": args.rounds, "methods": {}}
    for method in args.methods.split(","):
        result = bench_method(args.config, method, args.overrides, args.rounds, args.batches, device)
        report["methods"][method] = result
        med = result["median_s"]
        print(f"{method:8s} dense {med['dense']:.3f} s  rows {med['rows']:.3f} s  "
              f"speed-up {result['speedup_dense_over_rows']:.2f}x (best-of-N {result['speedup_best_of_n']:.2f}x)  "
              f"(label fraction "
              f"{result['label_fraction_student']:.2f})" + (f"  memory rows/dense "
              f"{result['memory_ratio_rows_over_dense']:.2f}" if "peak_bytes" in result else ""))
    report["machine"]["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
