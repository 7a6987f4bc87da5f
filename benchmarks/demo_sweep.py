"""Small, equal-budget sweeps of the `dwakd demo` recipe, scored on the dev splits only; every run is recorded.

Each variant is a JSON object of `DemoSettings` fields that replace the defaults (nested dicts replace whole
fields, e.g. {"student_training": {...}}); every method gets every variant and every training seed, so DSKD
and SFT get the same tuning budget as DWA-KD. A variant trains its students in its own folder under --out
(the suite, tokenizers and — while the teacher's settings are the defaults — the teacher and its cache are reused
from the first variant's folder, or from a folder an earlier run left under --out, through the demo's stage cache),
evaluates them on the dev splits (`--splits`, default every one: in-domain `dev` and the three that mirror the
out-of-domain test splits; never on a test split) and appends one record per (variant, method, training seed) to
--results: ROUGE-L per dev split, their mean (`dev_avg`, the dev analogue of the test table's Avg), CPU and wall
seconds.

    python benchmarks/demo_sweep.py --out runs/demo-sweep --results benchmarks/results/demo_sweep.json \\
        --variant lr2e-3='{}' --variant lr4e-3='{"student_training": {"max_steps": 300, ...}}'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from dwakd.demo.pipeline import DemoPipeline, library_versions
from dwakd.demo.settings import DemoSettings, demo_settings
from dwakd.demo.suite import DEV_SPLITS


def _variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition("=")
    return name, json.loads(body or "{}")


def _apply(base: DemoSettings, overrides: dict) -> DemoSettings:
    settings = demo_settings()
    for key, value in {**base.__dict__, **overrides}.items():
        setattr(settings, key, tuple(value) if key in ("methods", "train_seeds", "eval_seeds") else value)
    return settings


def _share(source: Path, target: Path, names: tuple[str, ...]) -> None:
    """Reuse finished stages of another folder (the stage cache checks their fingerprints as usual)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).is_dir() and not (target / name).exists():
            shutil.copytree(source / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--variant", action="append", type=_variant, required=True, metavar="NAME=JSON")
    parser.add_argument("--methods", default="sft,dskd,dwakd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--splits", default=",".join(DEV_SPLITS), help=f"dev splits to score (of {list(DEV_SPLITS)})")
    args = parser.parse_args()
    splits = tuple(args.splits.split(","))
    unknown = [split for split in splits if split not in DEV_SPLITS]
    if unknown:
        parser.error(f"--splits: {unknown} are not dev splits (choose from {list(DEV_SPLITS)})")

    results_path = Path(args.results)
    records = json.loads(results_path.read_text()) if results_path.is_file() else []
    out = Path(args.out)
    # stages to reuse: the first variant's, or those of an earlier run of this script into the same --out (each is
    # reused only while its fingerprint matches, e.g. not after a change to dwakd's code)
    first = next((p for p in sorted(out.iterdir()) if (p / "teacher").is_dir()), None) if out.is_dir() else None
    for name, overrides in args.variant:
        settings = _apply(demo_settings(), overrides)
        settings.methods = tuple(args.methods.split(","))
        settings.train_seeds = tuple(int(x) for x in args.seeds.split(","))
        folder = out / name
        if first is not None:
            _share(first, folder, ("data", "tokenizers", "teacher", "teacher_cache"))
        pipe = DemoPipeline(settings, folder, show_progress=False, echo=print, workers=args.workers)
        started, load = time.perf_counter(), os.getloadavg()[0]
        data = pipe.build_data()
        tokenizers = pipe.build_tokenizers(data)
        _, table = pipe.train_and_evaluate(data, tokenizers, splits=splits, out_dir=folder / "eval_dev")
        wall = time.perf_counter() - started
        first = first or folder
        per_method: dict[str, list[float]] = {}
        for row, per_split in table.scores.items():
            by_split = {split: statistics.fmean(per_split[split].values()) for split in splits}
            dev = statistics.fmean(by_split.values())
            info = pipe.log.train_info.get(row, {})
            method, _, seed = row.rpartition("-seed") if row != "teacher" else ("teacher", "", "")
            records.append({"variant": name, "overrides": overrides, "model": row, "method": method,
                            "train_seed": int(seed) if seed else None, "splits": list(splits),
                            "dev_avg": round(dev, 3), "dev_rouge_l": {k: round(v, 3) for k, v in by_split.items()},
                            "dev_per_sampling_seed": {split: per_split[split] for split in splits},
                            "train_cpu_seconds": info.get("cpu_seconds"),
                            "train_seconds": info.get("seconds"), "eval_cpu_seconds": info.get("eval_cpu_seconds"),
                            "reused": bool(pipe.log.cached.get(row)), "load_at_start": round(load, 2),
                            "variant_wall_seconds": round(wall, 1), "versions": library_versions()})
            if row != "teacher":
                per_method.setdefault(method, []).append(dev)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
        summary = ", ".join(f"{m} {statistics.fmean(v):.2f}±{statistics.stdev(v) if len(v) > 1 else 0:.2f}"
                            for m, v in per_method.items())
        print(f"variant {name}: dev Avg ROUGE-L ({'+'.join(splits)}) {summary} ({wall:.0f} s wall, "
              f"load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
