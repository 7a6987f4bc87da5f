"""The demo's report: result tables over training seeds, paired ranking checks, loss curves and report.md.

Every student of training seed k starts from the same initialisation and sees the same data order, so the
scores of two methods at seed k form a pair; a claim "A > B" is a one-sided paired t-test over training seeds
(`dwakd.evaluation.stats`) on the Avg column, each seed's score being the mean over the sampling seeds. The
teacher is one model, so its (fixed) score is compared with each training seed's student. A claim holds when
it has at least `MIN_SEEDS` pairs and p < `ALPHA`. Spreads over sampling seeds of one training run are shown
too, labelled as such, and never decide a claim.

The tables are `dwakd.evaluation.report.ScoreTable`s (the `dwakd eval` report code); every number is read from
the evaluation's scores or the training logs.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwakd.demo.settings import CACHE_LABEL, DemoSettings, RunLog, student_name
from dwakd.demo.suite import DEV_SPLITS, TEST_SPLITS
from dwakd.evaluation.report import ScoreTable, write_report
from dwakd.evaluation.stats import PairedComparison, paired_comparison

REPORT_SECTIONS = ("## Result", "## Ranking checks", "## Setup", "## Time", "## Files")
CLAIM_CHAIN = ("teacher", "dwakd", "dskd", "sft")  # the demo's headline: Teacher > DWA-KD > DSKD > SFT
BASELINE = "dskd"  # every method of the paper table is compared with it
ALPHA = 0.05
MIN_SEEDS = 3


def _method_options_text(options: dict[str, dict[str, Any]]) -> str:
    """Options per method, those sharing options grouped: "a, b: x = 1; library defaults otherwise"."""
    groups: dict[str, list[str]] = {}
    for method, values in options.items():
        if values:
            groups.setdefault(", ".join(f"{k} = {v}" for k, v in sorted(values.items())), []).append(method)
    if not groups:
        return "library defaults"
    shared = "; ".join(f"{', '.join(display_name(m) for m in methods)}: {text}" for text, methods in groups.items())
    return f"{shared}; library defaults otherwise"


def display_name(name: str) -> str:
    """Row label of a model in the tables: the method's title (`DistillationMethod.title`, a preset's own)."""
    from dwakd.methods import method_title

    return "Teacher" if name == "teacher" else method_title(name)


# ---- scores per training seed ---------------------------------------------------------------------------------------
@dataclass
class SeedScores:
    """Mean over sampling seeds of every (method, training seed, split); the teacher's per split."""

    splits: list[str]
    students: dict[str, dict[int, dict[str, float]]]  # method -> training seed -> split -> score
    teacher: dict[str, float] | None  # split -> score

    def seeds(self, method: str) -> list[int]:
        """Training seeds at which `method` has a score on every split."""
        return sorted(s for s, per in self.students.get(method, {}).items() if all(x in per for x in self.splits))

    def values(self, method: str, seeds: Sequence[int], split: str | None = None) -> list[float]:
        """Per training seed: the score on `split`, or the Avg over splits (None); the teacher's is repeated."""
        def one(per_split: dict[str, float]) -> float:
            return per_split[split] if split is not None else statistics.fmean(per_split[x] for x in self.splits)

        if method == "teacher":
            if self.teacher is None:
                raise KeyError("no teacher scores")
            return [one(self.teacher)] * len(seeds)
        return [one(self.students[method][s]) for s in seeds]

    def compare(self, better: str, worse: str, split: str | None = None) -> PairedComparison:
        """Paired comparison over the training seeds both have (the teacher has all of them)."""
        seeds = sorted(set(self.seeds(better) if better != "teacher" else self.seeds(worse))
                       & set(self.seeds(worse) if worse != "teacher" else self.seeds(better)))
        if not seeds:
            raise ValueError(f"no common training seeds for {better!r} and {worse!r}")
        return paired_comparison(self.values(better, seeds, split), self.values(worse, seeds, split))


def seed_scores(full: ScoreTable, methods: Sequence[str], train_seeds: Sequence[int]) -> SeedScores:
    """Collapse the sampling seeds of the evaluation table (rows `teacher` and `<method>-seed<k>`)."""
    splits = [name for name, _ in full.datasets]

    def collapse(row: str) -> dict[str, float] | None:
        per_split = full.scores.get(row)
        if not per_split or any(not per_split.get(x) for x in splits):
            return None
        return {x: statistics.fmean(per_split[x].values()) for x in splits}

    students: dict[str, dict[int, dict[str, float]]] = {}
    for method in methods:
        for seed in train_seeds:
            scores = collapse(student_name(method, seed))
            if scores is not None:
                students.setdefault(method, {})[seed] = scores
    return SeedScores(splits, students, collapse("teacher"))


def training_seed_table(full: ScoreTable, scores: SeedScores, methods: Sequence[str]) -> ScoreTable:
    """Students: each cell mean ± std over training seeds (of sampling-seed means); teacher: over sampling seeds."""
    table = ScoreTable(list(full.datasets), metric=full.metric)
    for dataset, per_seed in full.scores.get("teacher", {}).items():
        for seed, value in per_seed.items():
            table.add("Teacher †", dataset, seed, value)
    for method in methods:
        for seed, per_split in scores.students.get(method, {}).items():
            for split, value in per_split.items():
                table.add(display_name(method), split, seed, value)
    return table


def sampling_seed_table(full: ScoreTable, methods: Sequence[str], train_seed: int) -> ScoreTable:
    """Teacher and the students of one training seed, mean ± std over sampling seeds (descriptive only)."""
    table = ScoreTable(list(full.datasets), metric=full.metric)
    for row, label in [("teacher", "Teacher"), *((student_name(m, train_seed), display_name(m)) for m in methods)]:
        for dataset, per_seed in full.scores.get(row, {}).items():
            for seed, value in per_seed.items():
                table.add(label, dataset, seed, value)
    return table


# ---- claims ---------------------------------------------------------------------------------------------------------
def claim_pairs(available: Sequence[str]) -> list[tuple[str, str]]:
    """Consecutive pairs of Teacher > DWA-KD > DSKD > SFT among the rows that exist (e.g. no DWA-KD: T > DSKD > SFT)."""
    chain = [name for name in CLAIM_CHAIN if name in available]
    return list(zip(chain, chain[1:]))


@dataclass
class Check:
    """One ranking claim over training seeds: the paired comparison and whether it holds."""

    better: str
    worse: str
    comparison: PairedComparison
    holds: bool

    @property
    def claim(self) -> str:
        return f"{display_name(self.better)} > {display_name(self.worse)}"

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "over": "training seeds", "holds": self.holds, "alpha": ALPHA,
                "min_seeds": MIN_SEEDS, **self.comparison.to_dict()}


def ranking_checks(scores: SeedScores, alpha: float = ALPHA, min_seeds: int = MIN_SEEDS) -> list[Check]:
    """Each claim of the chain as a one-sided paired t-test over training seeds on the Avg column."""
    available = [m for m in scores.students if scores.seeds(m)] + (["teacher"] if scores.teacher else [])
    checks = []
    for better, worse in claim_pairs(available):
        comparison = scores.compare(better, worse)
        checks.append(Check(better, worse, comparison, comparison.holds(alpha, min_seeds)))
    return checks


def sampling_seed_margins(table: ScoreTable, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Descriptive: difference of Avg means of one training run vs the larger sampling-seed spread (decides nothing)."""
    rows = []
    for better, worse in pairs:
        a, b = table.average(display_name(better)), table.average(display_name(worse))
        if a is None or b is None:
            continue
        rows.append({"claim": f"{display_name(better)} > {display_name(worse)}", "margin": a.mean - b.mean,
                     "spread": max(a.std, b.std), "better_mean": a.mean, "worse_mean": b.mean})
    return rows


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _fmt_diff(c: PairedComparison) -> str:
    return f"{c.mean_diff:+.2f} ± {c.std_err:.2f}"


def paper_table(full: ScoreTable, scores: SeedScores, methods: Sequence[str], baseline: str = BASELINE) -> str:
    """Table 1 analogue: every method and split, Avg ± std over training seeds, paired Δ and p vs the baseline."""
    table = training_seed_table(full, scores, methods)
    header = ["Method", *(t for _, t in full.datasets), "Avg.", f"Δ Avg vs {display_name(baseline)} ± SE",
              "p (one-sided)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    rows = [("teacher", "Teacher †")] + [(m, display_name(m)) for m in methods]
    for method, label in rows:
        if label not in table.scores:
            continue
        cells = [table.cell(label, name) for name, _ in full.datasets] + [table.average(label)]
        delta, p, n = "", "", str(len(scores.seeds(method))) if method != "teacher" else "1"
        if method != baseline and scores.seeds(baseline) and (method == "teacher" or scores.seeds(method)):
            c = scores.compare(method, baseline)
            delta, p = _fmt_diff(c), _fmt_p(c.p_value)
        lines.append("| " + " | ".join([label, *(x.format() if x else "–" for x in cells), delta, p, n]) + " |")
    return "\n".join(lines) + "\n"


def ablation_methods(methods: Sequence[str]) -> list[str]:
    """The presets of DWA-KD's method class among `methods` (the paper's Table 3 rows), in registry order."""
    from dwakd.methods import get_method

    if "dwakd" not in methods:
        return []
    dwakd_class = get_method("dwakd")[0]
    return [m for m in methods if m != "dwakd" and get_method(m)[0] is dwakd_class]


def ablation_table(scores: SeedScores, variants: Sequence[str]) -> str:
    """Table 3 analogue: DSKD, each DWA-KD variant and DWA-KD.

    Avg over training seeds; paired Δ vs DSKD and vs DWA-KD.
    """
    header = ["Method", "Avg.", "Δ vs DSKD ± SE", "p (> DSKD)", "Δ vs DWA-KD ± SE", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method in [BASELINE, *variants, "dwakd"]:
        seeds = scores.seeds(method)
        if not seeds:
            continue
        values = scores.values(method, seeds)
        avg = f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
        vs_base = scores.compare(method, BASELINE) if method != BASELINE and scores.seeds(BASELINE) else None
        vs_full = scores.compare(method, "dwakd") if method != "dwakd" else None
        lines.append("| " + " | ".join([
            display_name(method), avg, _fmt_diff(vs_base) if vs_base else "",
            _fmt_p(vs_base.p_value) if vs_base else "", _fmt_diff(vs_full) if vs_full else "",
            str(len(seeds))]) + " |")
    return "\n".join(lines) + "\n"


def split_breakdown(full: ScoreTable, scores: SeedScores, pairs: Sequence[tuple[str, str]]) -> str:
    """Per claim, the paired mean difference ± SE on every split: does the claim hinge on one split?"""
    header = ["claim", *(t for _, t in full.datasets), "Avg.", "per seed (Avg)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for better, worse in pairs:
        per_split = [scores.compare(better, worse, split) for split, _ in full.datasets]
        avg = scores.compare(better, worse)
        diffs = ", ".join(f"{d:+.2f}" for d in avg.diffs)
        lines.append("| " + " | ".join([f"{display_name(better)} − {display_name(worse)}",
                                          *(_fmt_diff(c) for c in per_split), _fmt_diff(avg), diffs]) + " |")
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------------------------------------
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
        steps, style = [h["step"] for h in rows], {"label": display_name(name), "color": f"C{index % 10}"}
        ax_total.plot(steps, [h["loss"] for h in rows], **style)  # same colour per model as in results.png
        if name != "teacher" and all("ce" in h for h in rows):
            ax_ce.plot(steps, [h["ce"] for h in rows], **style)
        elif name == "teacher":
            ax_ce.plot([], [], **style)  # keeps one legend entry and colour per model in both panels
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


# ---- report.md ------------------------------------------------------------------------------------------------
@dataclass
class DemoReport:
    """What `write_demo_report` produced."""

    path: Path
    checks: list[Check]
    seed_table: ScoreTable  # over training seeds
    sampling_table: ScoreTable  # first training seed, over sampling seeds (descriptive)


def write_demo_report(out: Path, settings: DemoSettings, log: RunLog, full: ScoreTable, data: dict[str, Path],
                      tokenizers: dict[str, Path], methods: Sequence[str], echo=print) -> DemoReport:
    """Write results.{md,csv,png,json}, loss_curves.png, timings.json and report.md; print the result and claims."""
    s = settings
    methods = [m for m in methods if m not in log.failed]
    scores = seed_scores(full, methods, s.train_seeds)
    seed_table = training_seed_table(full, scores, methods)
    first = s.train_seeds[0]
    sampling = sampling_seed_table(full, methods, first)
    checks = ranking_checks(scores)
    margins = sampling_seed_margins(sampling, [(c.better, c.worse) for c in checks])
    seeds_text, eval_text = ", ".join(map(str, s.train_seeds)), ", ".join(map(str, s.eval_seeds))
    title = (f"ROUGE-L: students mean ± std over training seeds {seeds_text} (each the mean over sampling seeds "
             f"{eval_text}); † the one teacher, mean ± std over sampling seeds")
    write_report(seed_table, out, stem="results", title=title)
    sampling_title = f"ROUGE-L of the training-seed-{first} students, mean ± std over sampling seeds {eval_text}"
    write_report(sampling, out, stem="results_sampling_seeds", title=sampling_title)
    (out / "results.json").write_text(json.dumps({
        "evaluation": full.to_json(), "training_seeds": seed_table.to_json(), "sampling_seeds": sampling.to_json(),
        "checks": [c.to_dict() for c in checks], "sampling_seed_margins": margins, "failed": log.failed,
    }, indent=2), encoding="utf-8")
    curves = {"teacher": _log_history(out / "teacher")}
    for method in methods:
        curves[method] = _log_history(out / "students" / student_name(method, first))
    plot_loss_curves(curves, out / "loss_curves.png")
    (out / "timings.json").write_text(json.dumps({
        "wall_seconds": log.wall_seconds, "cpu_seconds": log.cpu_seconds, "threads": log.threads,
        "workers": log.workers, "load_at_start": log.load_at_start, "versions": log.versions,
        **({"teacher_cache": log.teacher_cache} if log.teacher_cache else {})}, indent=2),
        encoding="utf-8")

    pairs = [(c.better, c.worse) for c in checks]
    variants = ablation_methods(methods)
    lines = ["# dwakd demo: cross-tokenizer distillation on a generated instruction suite", "",
             "Teacher: Llama architecture with a byte-level BPE tokenizer; students: GPT-2 architecture with a "
             "WordPiece tokenizer; all trained here from scratch, on CPU, with `dwakd train`'s code path and "
             "evaluated with `dwakd eval`'s (sampling at temperature 1, ROUGE-L against the references).", "",
             *(["> This is the `--quick` smoke run: models far too small and too briefly trained for the numbers "
                "to mean anything, and too few training seeds for any claim to hold; it checks that every stage "
                "works. Run `dwakd demo` for the real table.", ""] if s.preset == "quick" else []),
             "## Result", "", paper_table(full, scores, methods), "",
             f"Students: mean ± std over training seeds {seeds_text}; each training seed's score is the mean over "
             f"sampling seeds {eval_text}. † The teacher is one model: mean ± std over sampling seeds. Δ: mean of the "
             f"per-seed paired differences of the Avg column ± its standard error; p: one-sided paired t-test.", ""]
    if log.teacher_cache:
        lines += [_cache_summary(log.teacher_cache) + " (see Setup).", ""]
    if variants:
        lines += ["**Ablations (paper Table 3 analogue)**", "", ablation_table(scores, variants), ""]
    if log.failed:
        lines += ["**Methods that failed to train** (left out of the tables):", "",
                  *(f"- `{m}`: {err}" for m, err in log.failed.items()), ""]
    lines += ["![results](results.png)", "", "![loss curves](loss_curves.png)", "", "## Ranking checks", "",
              f"Over training seeds: a claim holds when at least {MIN_SEEDS} training seeds give a one-sided paired "
              f"t-test p < {ALPHA} on the Avg column (every training seed gives all students the same initialisation "
              "and data order; the teacher's single score is compared with each seed's student).", "",
              "| claim | seeds | mean Δ ± SE | t | p (one-sided) | holds |", "|---|---:|---:|---:|---:|---|"]
    for c in checks:
        cmp = c.comparison
        t = "–" if cmp.t is None else f"{cmp.t:.2f}"
        lines.append(f"| {c.claim} ({cmp.mean_a:.2f} vs {cmp.mean_b:.2f}) | {cmp.n} | {_fmt_diff(cmp)} | {t} | "
                     f"{_fmt_p(cmp.p_value)} | {'yes' if c.holds else 'no'} |")
    if pairs:
        lines += ["", "Where each difference comes from (paired mean Δ ± SE over training seeds, per split):", "",
                  split_breakdown(full, scores, pairs)]
    lines += ["", f"Sampling seeds only (training seed {first}; descriptive, not used for the claims): difference of "
              "the Avg means vs the larger of the two spreads over sampling seeds.", "",
              "| claim | margin | spread over sampling seeds |", "|---|---:|---:|"]
    lines += [f"| {m['claim']} ({m['better_mean']:.2f} vs {m['worse_mean']:.2f}) | {m['margin']:+.2f} | "
              f"{m['spread']:.2f} |" for m in margins]
    lines += ["", sampling.to_markdown(title=sampling_title)]
    lines += _setup_lines(out, s, data, tokenizers, methods, log)
    lines += _time_lines(log)
    lines += ["", "## Files", "", "`demo_config.yaml` (settings), `data/` (suite), `tokenizers/`, `teacher/` and "
              "`students/<method>-seed<k>/` (checkpoints, `dwakd_config.yaml`, `trainer_state.json` logs), "
              "`eval/generations/` (every sampled response), `results.*` (tables over training seeds, chart, every "
              "score and check), `results_sampling_seeds.*`, `loss_curves.png`, `timings.json`, `demo.log`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")

    echo("")
    echo(paper_table(full, scores, methods))
    if variants:
        echo(ablation_table(scores, variants))
    for c in checks:
        cmp = c.comparison
        echo(f"{c.claim} over {cmp.n} training seeds: mean Δ {_fmt_diff(cmp)}, one-sided paired p = "
             f"{_fmt_p(cmp.p_value)} -> {'holds' if c.holds else 'does not hold'}")
    total_wall, total_cpu = log.wall_seconds.get("total", 0.0), log.cpu_seconds.get("total", 0.0)
    echo(f"report: {report}  (total {total_wall:.0f} s wall, {total_cpu:.0f} s CPU)")
    return DemoReport(report, checks, seed_table, sampling)


def _tail_words(rank: int) -> str:
    return f"a rank-{rank} tail" if rank else "one tail bucket"


def _cache_summary(cache: dict[str, Any]) -> str:
    """One sentence: which students read which teacher cache, and which ran the live teacher."""
    what = ("a lossless teacher cache (every logit, as the live teacher computes it)" if cache["mode"] == "lossless"
            else "a head-mode teacher cache (every logit recomputed from the cached final hidden state with the cached "
                 "LM head, as the live teacher computes it)" if cache["mode"] == "head-mode"
            else f"a {cache['mode']} teacher cache (the {cache['k']} likeliest tokens' log-probabilities and "
                 f"{_tail_words(cache['settings'].get('tail_rank', 0))} per position)")
    def names(methods) -> str:
        shown = [display_name(m) for m in methods]
        return " and ".join([", ".join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown) or "no"

    if cache["served"]:
        text = (f"Teacher cache (the default; `--live-teacher` runs the teacher instead): the "
                f"{names(cache['served'])} students read {what} instead of running the teacher")
    else:
        text = "Teacher cache: no method of this run can read one, so none was built"
    if cache["live"]:
        text += f"; {names(cache['live'])} trained with the live teacher, which the cache cannot stand in for"
    return text


def _cache_lines(cache: dict[str, Any]) -> list[str]:
    if not cache:
        return []
    line = f"- {_cache_summary(cache)}."
    if "examples" in cache:
        size = (cache["sizes"]["shard_bytes"] + cache["sizes"]["table_bytes"]) / 2**20
        line += (f" It is `{cache['folder']}/`, built once from the trained teacher over the students' training data: "
                 f"{cache['examples']} examples, {size:.1f} MiB, {cache['seconds']:.1f} s; tail masses at τ = "
                 f"{', '.join(f'{t:g}' for t in cache['settings']['temperatures'])}.")
    lines = [line]
    lines += [f"  - {display_name(m)}: the cache cannot serve it: {why}." for m, why in cache["live"].items()]
    return lines


def _setup_lines(out: Path, s: DemoSettings, data: dict[str, Path], tokenizers: dict[str, Path],
                 methods: Sequence[str], log: RunLog) -> list[str]:
    suite = json.loads((data["train"].parent / "suite.json").read_text(encoding="utf-8"))
    toks = json.loads((tokenizers["teacher"].parent / "tokenizers.json").read_text(encoding="utf-8"))
    per_split = toks.get("split_agreement", {})
    lines = ["", "## Setup", "", "| split | stands in for | records | words in | words out | in train | "
             "token-end F1 | same spans |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for split in ("train", "student_train", *DEV_SPLITS, *TEST_SPLITS):
        info = suite.get(split)
        if info is None:  # a folder written before the suite had this split
            continue
        role = TEST_SPLITS[split][1] if split in TEST_SPLITS else {
            "train": "teacher's training data", "student_train": "students' training data (first rows of train)"}.get(
            split, f"held out like {DEV_SPLITS.get(split)}, to choose settings")
        overlap = "–" if split in ("train", "student_train") else f"{info['in_train']:.0%}"
        agree = per_split.get(split)
        boundaries = f"{agree['boundary_f1']:.3f} | {agree['same_token_share']:.0%}" if agree else "– | –"
        lines.append(f"| {split} | {role} | {info['records']} | {info['input_words']} | {info['answer_words']} | "
                     f"{overlap} | {boundaries} |")
    agree = toks["test_split_agreement"]
    student_dir = out / "students" / student_name(methods[0], s.train_seeds[0]) if methods else out
    lines += ["", "`in train`: share of the split's (instruction, input) pairs that occur in the teacher's training "
                  "data (a superset of the students'). Token-end F1: agreement of the two tokenizers' token end "
                  "offsets on instruction, input and reference; same spans: share of student tokens that are also a "
                  "teacher token (the rest is where sequence-level alignment has work to do).", "",
              f"- Tokenizers: teacher {toks['teacher']['type']} ({toks['teacher']['vocab_size']} tokens), "
              f"student {toks['student']['type']} ({toks['student']['vocab_size']} tokens); on the test split "
              f"{agree['teacher_tokens_per_word']} vs {agree['student_tokens_per_word']} tokens per word, "
              f"token-end F1 {agree['boundary_f1']}, {agree['same_token_share']:.0%} of student tokens have "
              f"the same span as a teacher token.",
              "- Prompt: each record's own `prompt` field, Alpaca's sections without its preamble sentence "
              "(`### Instruction:` / `### Input:` / `### Response:`), for training and evaluation alike.",
              f"- Teacher: {_model_line(s.teacher_model, out / 'teacher')}; {_training_line(s.teacher_training)} "
              f"on {s.suite.train} examples.",
              f"- Students: {_model_line(s.student_model, student_dir)}, same initialisation (seed "
              f"{s.student_init_seed}); {_training_line(s.student_training)} on {s.suite.student_train} examples; "
              f"training seeds {', '.join(map(str, s.train_seeds))} (data order, projector initialisation).",
              *_cache_lines(log.teacher_cache),
              f"- Method options: {_method_options_text(s.method_options)}; projector lr {s.projector_lr}.",
              f"- Evaluation: sampling (temperature 1.0, top-p 1.0), at most {s.max_new_tokens} new tokens, "
              f"sampling seeds {', '.join(map(str, s.eval_seeds))}; ROUGE-L F1 ×100, max over references."]
    return lines


def _time_lines(log: RunLog) -> list[str]:
    lines = ["", "## Time", "", f"Load average at the start: {log.load_at_start:.2f}. "
             + ", ".join(f"{k} {v}" for k, v in log.versions.items()) + ". CPU seconds count every thread of every "
             "process of the stage; models are trained and evaluated as jobs on parallel worker processes, so the "
             "↳ rows overlap in time.", "",
             "| stage | processes × threads | wall seconds | CPU seconds | cached |", "|---|---:|---:|---:|---|"]
    for stage, seconds in log.wall_seconds.items():
        cached = log.cached.get(stage)
        reused = "" if cached is None else ("yes" if cached else "no")
        shape = f"{log.workers.get(stage, 1)} × {log.threads[stage]}" if stage in log.threads else ""
        lines.append(f"| {stage} | {shape} | {seconds:.1f} | {log.cpu_seconds.get(stage, 0.0):.1f} | {reused} |")
        if stage == "models":
            for model, info in log.train_info.items():
                trained = f"yes (trained in {info.get('seconds', 0.0):.0f} s)" if log.cached.get(model) else "no"
                train = "" if log.cached.get(model) else f"{info.get('seconds', 0.0):.1f}"
                train_cpu = "" if log.cached.get(model) else f"{info.get('cpu_seconds', 0.0):.1f}"
                lines.append(f"| ↳ train {model} | | {train} | {train_cpu} | {trained} |")
                if "eval_seconds" in info:
                    lines.append(f"| ↳ evaluate {model} | | {info['eval_seconds']:.1f} | "
                                 f"{info['eval_cpu_seconds']:.1f} | |")
                if model == "teacher" and "seconds" in log.teacher_cache:
                    cache, reused = log.teacher_cache, log.cached.get(CACHE_LABEL)
                    built = f"yes (built in {cache['seconds']:.0f} s)" if reused else "no"
                    wall, cpu = ("", "") if reused else (f"{cache['seconds']:.1f}", f"{cache['cpu_seconds']:.1f}")
                    lines.append(f"| ↳ build {CACHE_LABEL} ({cache['mode']}) | | {wall} | {cpu} | {built} |")
    return lines


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
