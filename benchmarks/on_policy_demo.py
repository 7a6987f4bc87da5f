"""On-policy vs off-policy distillation on the demo (issue 17): each method and training seed trained twice, paired.

The demo pipeline (`dwakd.demo.pipeline.DemoPipeline`) builds — or reuses from an earlier run in `--demo-dir` —
the instruction suite, the two tokenizers and the SFT teacher. Every (method, training seed) is then trained from
the demo's one student initialisation twice through `dwakd.run.train` (the `dwakd train` code path): off-policy,
and with `on_policy.fraction` of the micro-batches replaced by the student's own samples. All students are sampled
and scored by the demo's evaluation (the `dwakd eval` code path: per-item seeded sampling, ROUGE-L). The JSON keeps
every score, the per-seed paired differences (on − off), and the time cost: wall and CPU seconds per run and the
seconds spent generating as logged by the trainer (`generate_seconds`).

Settings are the demo's (`dwakd.demo.settings.demo_settings`) unless overridden on the command line; overrides
exist to make the measurement fit a machine and are recorded in the JSON. The on-policy twins are ordinary jobs of
the demo's worker pool (each right after its off-policy run, so background load hits both alike) and are cached by
the demo's stage fingerprints, so an interrupted measurement resumes and an earlier `dwakd demo` in the same folder
supplies the teacher and the off-policy students.

    PYTHONPATH=src python benchmarks/on_policy_demo.py --demo-dir runs/on-policy-demo \\
        --out benchmarks/results/on_policy_demo.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dwakd.demo.pipeline import DemoPipeline, demo_settings, fingerprint
from dwakd.demo.settings import student_name
from dwakd.demo.suite import TEST_SPLITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="runs/on-policy-demo", help="demo output folder (cached stages)")
    parser.add_argument("--out", default="benchmarks/results/on_policy_demo.json")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick preset (a smoke run)")
    parser.add_argument("--methods", nargs="+", default=["dskd", "dwakd"])
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.5, help="on_policy.fraction of the on-policy runs")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="on_policy.max_new_tokens (default: the data budget, max_length - max_prompt_length)")
    parser.add_argument("--student-steps", type=int, default=None, help="override the demo's student max_steps")
    parser.add_argument("--teacher-steps", type=int, default=None, help="override the demo's teacher max_steps")
    parser.add_argument("--eval-seeds", nargs="+", type=int, default=None, help="override the demo's sampling seeds")
    parser.add_argument("--splits", nargs="+", default=list(TEST_SPLITS), choices=list(TEST_SPLITS))
    parser.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: the demo's)")
    parser.add_argument("--bf16", choices=["demo", "on", "off"], default="demo",
                        help="bf16 autocast on CPU (the demo's default, or forced)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace):
    settings = demo_settings(args.quick)
    overrides: dict[str, Any] = {}
    if args.student_steps is not None:
        settings.student_training = {**settings.student_training, "max_steps": args.student_steps}
        overrides["student_training.max_steps"] = args.student_steps
    if args.teacher_steps is not None:
        settings.teacher_training = {**settings.teacher_training, "max_steps": args.teacher_steps}
        overrides["teacher_training.max_steps"] = args.teacher_steps
    if args.eval_seeds:
        settings.eval_seeds = tuple(args.eval_seeds)
        overrides["eval_seeds"] = list(args.eval_seeds)
    if args.bf16 != "demo":
        settings.bf16 = args.bf16 == "on"
        overrides["bf16"] = settings.bf16
    settings.methods = tuple(args.methods)
    settings.train_seeds = tuple(args.train_seeds)
    return settings, overrides


class OnPolicyDemo(DemoPipeline):
    """The demo pipeline with, next to every (method, training seed) student, its on-policy twin: same config, same
    initialisation and data order, plus the `on_policy` block. The twins are ordinary jobs of the demo's pool
    (parallel workers, stage cache keyed by the config, evaluation as soon as a model is trained)."""

    def __init__(self, settings, output_dir: Path, on_policy: dict[str, Any], **kwargs: Any):
        super().__init__(settings, output_dir, **kwargs)
        self.on_policy = on_policy

    def training_jobs(self, data, tokenizers):
        jobs = []
        for job in super().training_jobs(data, tokenizers):
            jobs.append(job)
            if job.kind != "train" or job.label == "teacher":
                continue
            seed = job.tree["seed"]
            label = on_policy_name(job.method, seed)
            folder = self.out / "students" / label
            tree = copy.deepcopy(job.tree)
            tree["training"]["output_dir"] = str(folder)
            tree["on_policy"] = dict(self.on_policy)
            jobs.append(dataclasses.replace(job, label=label, folder=folder, tree=tree,
                                            key=fingerprint(job.key, "on_policy", self.on_policy)))
        return jobs


def on_policy_name(method: str, seed: int) -> str:
    return f"{method}-onpolicy-seed{seed}"


def run_info(pipe: DemoPipeline, label: str, folder: Path) -> dict[str, Any]:
    """Training seconds (wall, CPU) from the demo's log and, from the run's train_summary.json, sampling time and the
    realised on-policy share."""
    info = {k: pipe.log.train_info.get(label, {}).get(k) for k in ("seconds", "cpu_seconds", "global_step")}
    summary = json.loads((folder / "train_summary.json").read_text(encoding="utf-8"))
    totals = summary.get("on_policy", {})
    batches = totals.get("micro_batches", 0)
    info.update({"generate_seconds": totals.get("generate_seconds", 0.0),
                 "train_runtime": summary["metrics"].get("train_runtime"),
                 "on_policy_fraction": round(totals["on_policy_micro_batches"] / batches, 4) if batches else 0.0})
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, overrides = settings_from(args)
    on_policy = {"fraction": args.fraction, "temperature": args.temperature}
    if args.max_new_tokens:
        on_policy["max_new_tokens"] = args.max_new_tokens
    pipe = OnPolicyDemo(settings, Path(args.demo_dir), on_policy, show_progress=False, workers=args.workers,
                        echo=lambda line: print(line, flush=True))
    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    data = pipe.build_data()
    tokenizers = pipe.build_tokenizers(data)
    models, table = pipe.train_and_evaluate(data, tokenizers, splits=tuple(args.splits))
    runs: dict[str, dict[str, Any]] = {}
    for method in settings.methods:
        for seed in settings.train_seeds:
            for mode, label in (("off", student_name(method, seed)), ("on", on_policy_name(method, seed))):
                runs[label] = {"method": method, "seed": seed, "mode": mode, **run_info(pipe, label, models[label])}
    result = summarise(table, runs, settings, args)
    result.update({"settings": settings.to_dict(), "overrides": overrides, "splits": args.splits,
                   "on_policy": {**on_policy, "max_new_tokens": on_policy.get(
                       "max_new_tokens", settings.max_length - settings.max_prompt_length)},
                   "teacher": pipe.log.train_info.get("teacher"), "cached": pipe.log.cached,
                   "workers": pipe.log.workers, "threads": pipe.log.threads,
                   "wall_seconds": round(time.perf_counter() - started, 1), "load_average_start": load_start,
                   "load_average_end": os.getloadavg(), "versions": pipe.log.versions,
                   "command": " ".join(sys.argv)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(markdown(result))
    return 0


def summarise(table, runs: dict[str, dict[str, Any]], settings, args: argparse.Namespace) -> dict[str, Any]:
    """ROUGE-L per run (mean over sampling seeds, per split and averaged over splits) and paired on − off."""
    scores: dict[str, dict[str, float]] = {}
    for name in ["teacher", *runs]:
        per_split = {split: statistics.fmean(table.scores[name][split].values()) for split in args.splits}
        scores[name] = {**{k: round(v, 3) for k, v in per_split.items()},
                        "average": round(statistics.fmean(per_split.values()), 3)}
    paired: dict[str, Any] = {}
    for method in settings.methods:
        diffs = {key: [scores[on_policy_name(method, s)][key] - scores[student_name(method, s)][key]
                       for s in settings.train_seeds] for key in [*args.splits, "average"]}
        cost = [runs[on_policy_name(method, s)]["seconds"] / runs[student_name(method, s)]["seconds"]
                for s in settings.train_seeds]
        cpu = [runs[on_policy_name(method, s)].get("cpu_seconds", float("nan"))
               / runs[student_name(method, s)].get("cpu_seconds", float("nan")) for s in settings.train_seeds]
        share = [runs[on_policy_name(method, s)]["generate_seconds"] / runs[on_policy_name(method, s)]["train_runtime"]
                 for s in settings.train_seeds]
        paired[method] = {
            "on_minus_off": {k: [round(x, 3) for x in v] for k, v in diffs.items()},
            "mean_difference": {k: round(statistics.fmean(v), 3) for k, v in diffs.items()},
            "sd_difference": {k: round(statistics.stdev(v), 3) if len(v) > 1 else None for k, v in diffs.items()},
            "seeds_on_better": sum(d > 0 for d in diffs["average"]),
            "wall_time_ratio_on_over_off": [round(x, 2) for x in cost],
            "cpu_time_ratio_on_over_off": [round(x, 2) for x in cpu],
            "generate_share_of_train_time": [round(x, 3) for x in share],
        }
        if len(settings.train_seeds) > 2:
            from scipy import stats

            test = stats.ttest_rel([scores[on_policy_name(method, s)]["average"] for s in settings.train_seeds],
                                   [scores[student_name(method, s)]["average"] for s in settings.train_seeds])
            paired[method]["paired_t_two_sided_p"] = round(float(test.pvalue), 4)
    return {"rouge_l": scores, "runs": runs, "paired": paired}


def markdown(result: dict[str, Any]) -> str:
    splits = result["splits"]
    lines = ["| run | " + " | ".join(splits) + " | average | train s | CPU s | generate s |",
             "|---" * (len(splits) + 5) + "|"]
    for name, row in result["rouge_l"].items():
        run = result["runs"].get(name, {})
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.2f}" for s in splits) + f" | {row['average']:.2f} | "
                     f"{run.get('seconds', '')} | {run.get('cpu_seconds', '')} | {run.get('generate_seconds', '')} |")
    for method, p in result["paired"].items():
        lines.append(f"\n{method}: on − off (average ROUGE-L) per seed {p['on_minus_off']['average']}, mean "
                     f"{p['mean_difference']['average']:+.2f} (sd {p['sd_difference']['average']}), on better in "
                     f"{p['seeds_on_better']}/{len(p['on_minus_off']['average'])} seeds, "
                     f"p = {p.get('paired_t_two_sided_p')}; wall-time ratio {p['wall_time_ratio_on_over_off']}, "
                     f"generation share {p['generate_share_of_train_time']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
