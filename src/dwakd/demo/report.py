"""The demo's report: a miniature paper Table 1, the ranking checks, loss curves and a short report.md.

The result tables are `dwakd.evaluation.report.ScoreTable`s (the `dwakd eval` report code); this module only
chooses their rows, adds the training-seed view, plots the loss curves and writes the prose around them.
Every number printed here is read from the evaluation's scores or the training logs; nothing is tuned.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwakd.demo.suite import TEST_SPLITS
from dwakd.evaluation.report import ScoreTable, Summary, write_report

if TYPE_CHECKING:  # pragma: no cover
    from dwakd.demo.pipeline import DemoPipeline, DemoSettings

DISPLAY_NAMES = {"teacher": "Teacher", "sft": "SFT", "dskd": "DSKD", "dwakd": "DWA-KD", "uld": "ULD",
                 "mined": "MinED", "multilevel_ot": "MultiLevelOT", "dskdv2": "DSKDv2", "dwakdv2": "DWA-KDv2",
                 "dwakd-ew": "DWA-KD w/ EW", "dwakd-dtw": "DWA-KD w/ DTW", "dwakd-bdtw": "DWA-KD w/ bDTW",
                 "dwakd-nogate": "DWA-KD w/o gate"}
REPORT_SECTIONS = ("## Result", "## Ranking checks", "## Setup", "## Time", "## Files")


def display_name(name: str) -> str:
    """Row label of a model in the tables."""
    return DISPLAY_NAMES.get(name, name)


def split_tables(full: ScoreTable, settings: "DemoSettings",
                 student_name: Callable[[str, int], str]) -> tuple[ScoreTable, ScoreTable | None]:
    """(main table: teacher + each method at the first training seed, spread over sampling seeds;
    training-seed table: each cell averaged over sampling seeds, spread over training seeds, or None)."""
    main = ScoreTable(list(full.datasets), metric=full.metric)
    rows = ["teacher", *(student_name(m, settings.train_seeds[0]) for m in settings.methods)]
    for name in rows:
        for dataset, per_seed in full.scores.get(name, {}).items():
            for seed, value in per_seed.items():
                main.add(display_name(name), dataset, seed, value)
    if len(settings.train_seeds) < 2:
        return main, None
    by_train_seed = ScoreTable(list(full.datasets), metric=full.metric)
    for method in settings.methods:
        for seed in settings.train_seeds:
            for dataset, per_seed in full.scores.get(student_name(method, seed), {}).items():
                by_train_seed.add(display_name(method), dataset, seed, statistics.fmean(per_seed.values()))
    return main, by_train_seed


def ranking_checks(table: ScoreTable, label: str) -> list[dict[str, Any]]:
    """The issue's claims, computed: Teacher > SFT, DWA-KD > DSKD and DWA-KD > SFT on the average, each by more
    than the larger of the two rows' spreads (std of the average over the table's seeds)."""
    averages = {m: table.average(m) for m in table.models}
    checks = []
    for better, worse in (("Teacher", "SFT"), ("DWA-KD", "DSKD"), ("DWA-KD", "SFT")):
        a, b = averages.get(better), averages.get(worse)
        if a is None or b is None:
            continue
        margin = a.mean - b.mean
        spread = max(a.std, b.std)
        checks.append({"claim": f"{better} > {worse}", "seeds": label, "margin": round(margin, 2),
                       "spread": round(spread, 2), "holds": bool(margin > spread and a.n > 1 and b.n > 1),
                       "better_mean": round(a.mean, 2), "worse_mean": round(b.mean, 2)})
    return checks


def _log_history(folder: Path) -> list[dict[str, Any]]:
    state = folder / "trainer_state.json"
    if not state.is_file():
        return []
    return json.loads(state.read_text(encoding="utf-8")).get("log_history", [])


def plot_loss_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Two panels: the student cross-entropy on gold tokens per method, and each run's total training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ce, ax_total) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, history) in enumerate(curves.items()):
        rows = [h for h in history if "loss" in h and "step" in h]
        if not rows:
            continue
        steps, style = [h["step"] for h in rows], {"label": display_name(name), "color": f"C{index}"}
        ax_total.plot(steps, [h["loss"] for h in rows], **style)  # same colour per model as in results.png
        if name != "teacher" and all("ce" in h for h in rows):
            ax_ce.plot(steps, [h["ce"] for h in rows], **style)
    ax_ce.set_title("student cross-entropy on gold tokens (train)")
    ax_total.set_title("total training loss (each method's own objective)")
    for ax in (ax_ce, ax_total):
        ax.set_xlabel("optimizer step")
        ax.grid(linestyle=":")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(summary: Summary | None) -> str:
    return "–" if summary is None else summary.format()


def write_demo_report(pipeline: "DemoPipeline", table: ScoreTable, seed_table: ScoreTable | None,
                      data: dict[str, Path], tokenizers: dict[str, Path]) -> tuple[Path, list[dict[str, Any]]]:
    """Write results.{md,csv,png,json}, loss_curves.png, timings.json and report.md; print the table."""
    out, s = pipeline.out, pipeline.settings
    title = f"ROUGE-L (mean ± std over sampling seeds {', '.join(map(str, s.eval_seeds))})"
    write_report(table, out, stem="results", title=title)
    checks = ranking_checks(table, "sampling seeds")
    if seed_table is not None:
        write_report(seed_table, out, stem="results_train_seeds",
                     title=f"ROUGE-L (mean ± std over training seeds {', '.join(map(str, s.train_seeds))})")
        (out / "results.json").write_text(json.dumps({"sampling_seeds": table.to_json(),
                                                      "training_seeds": seed_table.to_json()}, indent=2))
        checks += ranking_checks(seed_table, "training seeds")
    curves = {"teacher": _log_history(out / "teacher")}
    for method in s.methods:
        curves[method] = _log_history(out / "students" / pipeline.student_name(method, s.train_seeds[0]))
    plot_loss_curves(curves, out / "loss_curves.png")
    (out / "timings.json").write_text(json.dumps({"wall_seconds": pipeline.timings, "cpu_seconds": pipeline.cpu_timings,
                                                  "threads": pipeline.stage_threads,
                                                  "load_at_start": pipeline.load_at_start},
                                                 indent=2), encoding="utf-8")

    suite = json.loads((data["train"].parent / "suite.json").read_text(encoding="utf-8"))
    toks = json.loads((tokenizers["teacher"].parent / "tokenizers.json").read_text(encoding="utf-8"))
    lines = [f"# dwakd demo: cross-tokenizer distillation on a generated instruction suite", "",
             "Teacher: Llama architecture with a byte-level BPE tokenizer; students: GPT-2 architecture with a "
             "WordPiece tokenizer; all trained here from scratch, on CPU, with `dwakd train`'s code path and "
             "evaluated with `dwakd eval`'s (sampling at temperature 1, ROUGE-L against the references).", "",
             *(["> This is the `--quick` smoke run: models far too small and too briefly trained for the numbers "
                "to mean anything; it checks that every stage works. Run `dwakd demo` for the real table.", ""]
               if s.preset == "quick" else []),
             "## Result", "", table.to_markdown(title=title), ""]
    if seed_table is not None:
        lines += [seed_table.to_markdown(title="Students over training seeds (each cell: mean over sampling seeds, "
                                               "then mean ± std over training seeds)"), ""]
    lines += ["![results](results.png)", "", "![loss curves](loss_curves.png)", "", "## Ranking checks", "",
              "A claim holds when the difference of the two averages exceeds the larger of their two spreads.", "",
              "| claim | over | margin | spread | holds |", "|---|---|---:|---:|---|"]
    for c in checks:
        lines.append(f"| {c['claim']} ({c['better_mean']:.2f} vs {c['worse_mean']:.2f}) | {c['seeds']} | "
                     f"{c['margin']:+.2f} | {c['spread']:.2f} | {'yes' if c['holds'] else 'no'} |")
    lines += ["", "## Setup", "", "| split | stands in for | records | words in | words out | in train |",
              "|---|---|---:|---:|---:|---:|"]
    for split in ("train", "student_train", "dev", *TEST_SPLITS):
        info = suite[split]
        role = TEST_SPLITS[split][1] if split in TEST_SPLITS else {
            "train": "teacher's training data", "student_train": "students' training data (first rows of train)",
            "dev": "held out (used to choose settings)"}[split]
        lines.append(f"| {split} | {role} | {info['records']} | {info['input_words']} | {info['answer_words']} | "
                     f"{info['in_train']:.0%} |")
    agree = toks["test_split_agreement"]
    lines += ["", f"- Tokenizers: teacher {toks['teacher']['type']} ({toks['teacher']['vocab_size']} tokens), "
                  f"student {toks['student']['type']} ({toks['student']['vocab_size']} tokens); on the test split "
                  f"{agree['teacher_tokens_per_word']} vs {agree['student_tokens_per_word']} tokens per word, "
                  f"token-end F1 {agree['boundary_f1']}, {agree['same_token_share']:.0%} of student tokens have "
                  f"the same span as a teacher token.",
              f"- Teacher: {_model_line(s.teacher_model, out / 'teacher')}; {_training_line(s.teacher_training)} "
              f"on {s.suite.train} examples.",
              f"- Students: {_model_line(s.student_model, out / 'students' / pipeline.student_name(s.methods[0], s.train_seeds[0]))}"
              f", same initialisation (seed {s.student_init_seed}); {_training_line(s.student_training)} on "
              f"{s.suite.student_train} examples; training seeds {', '.join(map(str, s.train_seeds))}.",
              f"- Method options: {json.dumps(s.method_options) if s.method_options else 'library defaults'}; "
              f"projector lr {s.projector_lr}.",
              f"- Evaluation: sampling (temperature 1.0, top-p 1.0), at most {s.max_new_tokens} new tokens, "
              f"sampling seeds {', '.join(map(str, s.eval_seeds))}; ROUGE-L F1 ×100, max over references.", "",
              "## Time", "", f"Load average at the start: {pipeline.load_at_start:.2f}. Torch threads are chosen before "
              "each stage from the cores other processes leave free; CPU seconds count every thread of this process.",
              "", "| stage | threads | wall seconds | CPU seconds | cached |", "|---|---:|---:|---:|---|"]
    for stage, seconds in pipeline.timings.items():
        key = stage.replace("train ", "")
        cached = pipeline.cached.get(key if stage.startswith("train") else stage)
        trained = pipeline.train_info.get(key, {}).get("seconds") if stage.startswith("train") else None
        reused = "" if cached is None else ("no" if not cached else
                                           f"yes (trained in {trained:.0f} s)" if trained is not None else "yes")
        lines.append(f"| {stage} | {pipeline.stage_threads.get(stage, '')} | {seconds:.1f} | "
                     f"{pipeline.cpu_timings.get(stage, 0.0):.1f} | {reused} |")
    lines += ["", "## Files", "", "`demo_config.yaml` (settings), `data/` (suite), `tokenizers/`, `teacher/` and "
              "`students/<method>/` (checkpoints, `dwakd_config.yaml`, `trainer_state.json` logs), "
              "`eval/generations/` (every sampled response), `results.*` (table, chart, scores), "
              "`loss_curves.png`, `timings.json`, `demo.log`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    pipeline.echo("")
    pipeline.echo(table.to_markdown(title=title))
    if seed_table is not None:
        pipeline.echo(seed_table.to_markdown(title="over training seeds"))
    for c in checks:
        pipeline.echo(f"{c['claim']} ({c['seeds']}): margin {c['margin']:+.2f}, spread {c['spread']:.2f} -> "
                      f"{'holds' if c['holds'] else 'does not hold'}")
    pipeline.echo(f"report: {report}  (total {pipeline.timings.get('total', 0):.0f} s wall, "
                  f"{pipeline.cpu_timings.get('total', 0):.0f} s CPU)")
    return report, checks


def _model_line(model: dict[str, Any], folder: Path) -> str:
    params = ""
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            total = sum(_numel(handle.get_slice(k).get_shape()) for k in handle.keys())
        params = f", {total / 1e6:.2f}M parameters"
    return (f"{model['arch']} {model['num_layers']} layers, d={model['hidden_size']}, {model['num_heads']} heads, "
            f"FFN {model['intermediate_size']}{params}")


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _training_line(training: dict[str, Any]) -> str:
    return (f"{training['max_steps']} steps, batch {training['per_device_train_batch_size']}, "
            f"lr {training['learning_rate']}")
