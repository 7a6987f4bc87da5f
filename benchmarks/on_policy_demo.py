"""On-policy vs off-policy distillation on the demo (issue 17): each method and training seed trained twice, paired.

The demo pipeline (`dwakd.demo.pipeline.DemoPipeline`) builds — or reuses from an earlier run in `--demo-dir` —
the instruction suite, the two tokenizers and the SFT teacher. Every (method, training seed) is then trained from
the demo's one student initialisation twice through `dwakd.run.train` (the `dwakd train` code path): off-policy,
and with `on_policy.fraction` of the micro-batches replaced by the student's own samples. All students are sampled
and scored by the demo's evaluation (the `dwakd eval` code path: per-item seeded sampling, ROUGE-L). The JSON keeps
every score, the per-seed paired differences (on − off), and the time cost: wall and CPU seconds per run and the
seconds spent generating as logged by the trainer (`generate_seconds`).

Settings are the demo's (`dwakd.demo.pipeline.demo_settings`) unless overridden on the command line; overrides
exist to make the measurement fit a loaded machine and are recorded in the JSON. Runs are cached by a fingerprint
of their config, so an interrupted measurement resumes; on and off runs of one seed are trained back to back
(alternating which goes first) so that background load hits both alike.

    PYTHONPATH=src python benchmarks/on_policy_demo.py --demo-dir runs/on-policy-demo \\
        --out benchmarks/results/on_policy_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dwakd.demo.pipeline import DemoPipeline, demo_settings, fingerprint
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


def logged_generation(folder: Path) -> dict[str, Any]:
    """What the run's train_summary.json says about sampling: seconds generating, realised on-policy share."""
    summary = json.loads((folder / "train_summary.json").read_text(encoding="utf-8"))
    totals = summary.get("on_policy", {})
    batches = totals.get("micro_batches", 0)
    return {"generate_seconds": totals.get("generate_seconds", 0.0),
            "train_runtime": summary["metrics"].get("train_runtime"),
            "on_policy_fraction": round(totals["on_policy_micro_batches"] / batches, 4) if batches else 0.0}


def train_student(pipe: DemoPipeline, data, tokenizers, teacher_dir: Path, method: str, seed: int, mode: str,
                  args: argparse.Namespace, root: Path, eval_dir: Path) -> tuple[str, Path, dict[str, Any]]:
    name = f"{method}-{mode}-seed{seed}"
    folder = root / name
    tree = pipe.student_config(data, tokenizers, method, seed, teacher_dir, folder)
    if mode == "on":
        tree["on_policy"] = {"fraction": args.fraction, "temperature": args.temperature,
                             "max_new_tokens": args.max_new_tokens}
    key = fingerprint(pipe.tokenizer_key, pipe.teacher_key, {k: v for k, v in tree.items() if k != "teacher"})
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    info = pipe._train(tree, folder, key, name)  # cached by fingerprint (the demo's stage cache)
    if not pipe.cached[name]:
        info["cpu_seconds"] = round(time.process_time() - cpu, 2)
        info["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        (folder / "demo_stage.json").write_text(json.dumps({"fingerprint": key, **info}, indent=2), encoding="utf-8")
        shutil.rmtree(eval_dir / "generations" / name, ignore_errors=True)  # retrained: old samples are stale
    return name, folder, {**info, **logged_generation(folder)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, overrides = settings_from(args)
    out_dir = Path(args.demo_dir)
    pipe = DemoPipeline(settings, out_dir, show_progress=False, echo=lambda line: print(line, flush=True))
    started = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    data = pipe.build_data()
    tokenizers = pipe.build_tokenizers(data)
    teacher_dir = pipe.train_teacher(data, tokenizers)
    root, eval_dir = out_dir / "on_policy", out_dir / "on_policy_eval"
    runs: dict[str, dict[str, Any]] = {}
    models: dict[str, Path] = {"teacher": teacher_dir}
    for i, seed in enumerate(settings.train_seeds):
        for j, method in enumerate(settings.methods):
            order = ("off", "on") if (i + j) % 2 == 0 else ("on", "off")
            for mode in order:
                name, folder, info = train_student(pipe, data, tokenizers, teacher_dir, method, seed, mode, args,
                                                   root, eval_dir)
                runs[name] = {"method": method, "seed": seed, "mode": mode, **info}
                models[name] = folder
                print(f"  {name}: {json.dumps(runs[name])}", flush=True)
    table = pipe.evaluate(models, data, splits=tuple(args.splits), out_dir=eval_dir)
    result = summarise(table, runs, settings, args)
    result.update({"settings": settings.to_dict(), "overrides": overrides, "splits": args.splits,
                   "on_policy": {"fraction": args.fraction, "temperature": args.temperature,
                                 "max_new_tokens": (args.max_new_tokens
                                                    or settings.max_length - settings.max_prompt_length)},
                   "teacher": pipe.train_info.get("teacher"), "wall_seconds": round(time.perf_counter() - started, 1),
                   "load_average_end": os.getloadavg(), "command": " ".join(sys.argv)})
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
        diffs = {key: [scores[f"{method}-on-seed{s}"][key] - scores[f"{method}-off-seed{s}"][key]
                       for s in settings.train_seeds] for key in [*args.splits, "average"]}
        cost = [runs[f"{method}-on-seed{s}"]["seconds"] / runs[f"{method}-off-seed{s}"]["seconds"]
                for s in settings.train_seeds]
        cpu = [runs[f"{method}-on-seed{s}"].get("cpu_seconds", float("nan"))
               / runs[f"{method}-off-seed{s}"].get("cpu_seconds", float("nan")) for s in settings.train_seeds]
        share = [runs[f"{method}-on-seed{s}"]["generate_seconds"] / runs[f"{method}-on-seed{s}"]["train_runtime"]
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

            test = stats.ttest_rel([scores[f"{method}-on-seed{s}"]["average"] for s in settings.train_seeds],
                                   [scores[f"{method}-off-seed{s}"]["average"] for s in settings.train_seeds])
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
