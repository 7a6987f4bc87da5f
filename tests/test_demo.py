"""Tests of the embedded demo: the generated suite, the two tokenizers, and `dwakd demo --quick` end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_robustness import LOGGED_UNIT

from dwakd.demo import suite as S
from dwakd.demo.tokenizers import (
    TokenizerSettings,
    boundary_agreement,
    train_tokenizers,
)
from dwakd.tokenizers import load_tokenizer


def _refs(row: dict) -> list[str]:
    return [row["output"]] if isinstance(row["output"], str) else row["output"]


def test_suite_is_deterministic_and_splits_differ_as_designed():
    train = S.generate_split("train", 700)
    assert train == S.generate_split("train", 700)
    assert S.generate_split("test", 50) != S.generate_split("dev", 50)
    seen_families = {r["family"] for r in train}
    assert seen_families == {f.name for f in S.FAMILIES}

    phrasing = S.generate_split("ood_phrasing", 140)
    training_phrasings = {p for f in S.FAMILIES for p in f.phrasings}
    held_out = {p for f in S.FAMILIES for p in f.held_out}
    assert not training_phrasings & held_out
    train_instructions = {r["instruction"] for r in train}
    assert not {r["instruction"] for r in phrasing} & train_instructions

    tasks = S.generate_split("ood_tasks", 80)
    assert {r["family"] for r in tasks} == set(S.UNSEEN_FAMILIES)
    assert not {r["family"] for r in tasks} & seen_families

    def mean_len(rows, key):
        return sum(len((r["input"] if key == "input" else _refs(r)[0]).split()) for r in rows) / len(rows)

    long = S.generate_split("ood_long", 140)
    test = S.generate_split("test", 140)
    assert mean_len(long, "input") > 1.5 * mean_len(test, "input")
    assert mean_len(long, "output") > 1.5 * mean_len(test, "output")


def test_checkable_answers_are_correct():
    for row in S.generate_split("test", 280):
        ref = _refs(row)[0]
        if row["family"] == "sort":
            numbers = [int(x) for x in row["input"].split(", ")]
            assert ref == ", ".join(map(str, sorted(numbers)))
        elif row["family"] == "reverse":
            assert ref.split(", ") == row["input"].split(", ")[::-1]
        elif row["family"] == "count":
            assert ref == f"There are {len(row['input'].split(', '))} items in the list."
        elif row["family"] == "arith":
            expression = ref.split(" = ")[0]
            assert re.fullmatch(r"[\d +-]+", expression)
            assert ref == f"{expression} = {eval(expression)}."  # noqa: S307 - digits and +/- only
        elif row["family"] == "longest":
            words = row["input"].split(", ")
            assert ref == f"The longest word is {max(words, key=len)}."
            assert len({len(w) for w in words}) == len(words)


def test_suite_files_and_stats(tmp_path: Path):
    sizes = S.SuiteSizes(train=300, student_train=100, dev=20, test=28)
    paths = S.build_suite(tmp_path, sizes)
    stats = S.suite_stats(paths)
    assert stats["train"]["records"] == 300 and stats["student_train"]["records"] == 100
    assert all(stats[name]["records"] == 28 for name in S.TEST_SPLITS)
    assert stats["ood_tasks"]["in_train"] == 0.0
    assert S.suite_fingerprint(sizes) != S.suite_fingerprint(S.SuiteSizes(train=301, student_train=100))
    with pytest.raises(ValueError):
        S.SuiteSizes(train=10, student_train=11)


def test_tokenizers_are_different_and_keep_the_text(tmp_path: Path):
    paths = S.build_suite(tmp_path / "data", S.SuiteSizes(train=600, student_train=100, dev=8, test=30))
    settings = TokenizerSettings(teacher_vocab=900, student_vocab=500)
    dirs = train_tokenizers(S.corpus_text(paths), settings, tmp_path / "tok")
    teacher, student = load_tokenizer(str(dirs["teacher"])), load_tokenizer(str(dirs["student"]))
    assert teacher.eos_token and student.eos_token and len(teacher) != len(student)
    texts = [f"{r['instruction']} {r['input']} {_refs(r)[0]}" for r in S.read_jsonl(paths["test"])]
    agreement = boundary_agreement(teacher, student, texts)
    assert agreement["boundary_f1"] < 0.98 and agreement["same_token_share"] < 0.98
    squash = lambda t: re.sub(r"\s+", "", t)  # noqa: E731 - WordPiece decoding re-spaces punctuation
    for text in texts[:10]:
        assert teacher.decode(teacher(text, add_special_tokens=False)["input_ids"]) == text
        assert squash(student.decode(student(text, add_special_tokens=False)["input_ids"])) == squash(text)
        assert student.unk_token_id not in student(text, add_special_tokens=False)["input_ids"]


def test_demo_quick_end_to_end(tmp_path: Path, capsys):
    """`dwakd demo --quick` through the CLI: every artefact exists and the report has the promised structure."""
    import yaml

    from dwakd.cli import main
    from dwakd.demo.pipeline import run_demo
    from dwakd.demo.report import REPORT_SECTIONS

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Teacher † |" in printed and "| DWA-KD |" in printed
    assert "DWA-KD > DSKD over 2 training seeds" in printed

    for name in ("report.md", "results.md", "results.csv", "results.png", "results.json", "loss_curves.png",
                 "results_sampling_seeds.md", "demo_config.yaml", "timings.json", "demo.log", "data/train.jsonl",
                 "data/suite.json", "tokenizers/teacher/tokenizer.json", "tokenizers/student/tokenizer.json",
                 "teacher/model.safetensors", "teacher/trainer_state.json", "teacher/dwakd_config.yaml"):
        assert (out / name).is_file(), name
    for method in ("sft", "dskd", "dwakd"):
        for seed in (0, 1):
            assert (out / "students" / f"{method}-seed{seed}" / "model.safetensors").is_file()
            assert (out / "students" / f"{method}-seed{seed}" / "trainer_state.json").is_file()
    # by default the distilled students read a head-mode teacher cache built once, the SFT students need no teacher
    manifest = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    assert manifest["state"] == "complete" and manifest["settings"]["logits"] == "head"
    for name, cached in (("dskd-seed0", True), ("dwakd-seed1", True), ("sft-seed0", False)):
        config = yaml.safe_load((out / "students" / name / "dwakd_config.yaml").read_text())
        assert bool((config.get("teacher") or {}).get("cache")) == cached, name

    report = (out / "report.md").read_text()
    for section in REPORT_SECTIONS:
        assert section in report
    header = next(line for line in report.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][:6] == ["Method", "Suite", "Phrasing", "Long", "Tasks",
                                                                     "Avg."]
    result_table = report[report.index("## Result"):report.index("## Ranking checks")]
    rows = [line for line in result_table.splitlines() if re.match(r"\| (Teacher †|SFT|DSKD|DWA-KD) \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["Teacher †", "SFT", "DSKD", "DWA-KD"]
    for row in rows:  # every score cell is "mean ± std" (over two training seeds; the teacher over sampling seeds)
        cells = [c.strip() for c in row.strip("|").split("|")[1:6]]
        assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c) for c in cells), row
    # two training seeds are too few for any claim: the quick run never claims a ranking
    assert "| no |" in report and "| yes |" not in report

    results = json.loads((out / "results.json").read_text())
    assert set(results["training_seeds"]["summary"]) == {"Teacher †", "SFT", "DSKD", "DWA-KD"}
    assert [d["name"] for d in results["training_seeds"]["datasets"]] == ["test", "ood_phrasing", "ood_long",
                                                                          "ood_tasks"]
    assert set(results["evaluation"]["scores"]) == {"teacher"} | {f"{m}-seed{s}" for m in ("sft", "dskd", "dwakd")
                                                                   for s in (0, 1)}
    assert all(len(per_seed) == 2 for model in results["evaluation"]["scores"].values() for per_seed in model.values())
    assert [c["claim"] for c in results["checks"]] == ["Teacher > DWA-KD", "DWA-KD > DSKD", "DSKD > SFT"]
    assert all(c["n"] == 2 and not c["holds"] for c in results["checks"])

    # A rerun reuses every stage (teacher included) and reports the same numbers; it scores the saved generations
    # on two worker processes (the pool path of the pipeline).
    again = run_demo(out, quick=True, show_progress=False, echo=lambda _: None, workers=2)
    assert again.log.workers["models"] == 2
    assert all(again.cached[stage] for stage in ("suite", "tokenizers", "teacher", "teacher cache", "sft-seed0",
                                                 "dskd-seed1", "dwakd-seed1"))
    assert again.evaluation.to_json()["scores"] == results["evaluation"]["scores"]


def _step_losses(folder: Path) -> list[dict]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


def test_demo_step_budgets_from_the_command_line(tmp_path: Path):
    """`--teacher-steps` / `--student-steps` replace the preset's step counts (and are part of the settings)."""
    import yaml

    from dwakd.cli import build_parser, main

    parse = build_parser().parse_args
    args = parse(["demo", "--teacher-steps", "200", "--student-steps", "250"])
    assert (args.teacher_steps, args.student_steps) == (200, 250)
    for bad in ("0", "-3", "1.5"):
        with pytest.raises(SystemExit):
            parse(["demo", "--student-steps", bad])
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--output", str(out), "--methods", "sft", "--train-seeds", "0",
                 "--seeds", "10", "--workers", "1", "--teacher-steps", "3", "--student-steps", "2"]) == 0
    settings = yaml.safe_load((out / "demo_config.yaml").read_text())
    assert settings["teacher_training"]["max_steps"] == 3 and settings["student_training"]["max_steps"] == 2
    for folder, steps in ((out / "teacher", 3), (out / "students" / "sft-seed0", 2)):
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == steps, folder


def test_demo_teacher_cache_option_and_the_methods_it_serves():
    """`--teacher-cache [K]`: head mode by default, K ≥ 1 top-K, 'vocab' is lossless (0); a method the cache cannot
    serve goes live."""
    from dwakd.cli import build_parser
    from dwakd.demo.pipeline import DemoPipeline
    from dwakd.demo.settings import demo_settings

    parse = build_parser().parse_args
    assert parse(["demo", "--quick"]).teacher_cache is None  # the preset's cache (head mode)
    assert demo_settings().teacher_cache_k == demo_settings(quick=True).teacher_cache_k == "head"
    assert parse(["demo", "--live-teacher"]).live_teacher
    with pytest.raises(SystemExit):
        parse(["demo", "--live-teacher", "--teacher-cache"])
    assert parse(["demo", "--teacher-cache", "--quick"]).teacher_cache == "head"
    assert parse(["demo", "--teacher-cache", "16"]).teacher_cache == 16
    assert parse(["demo", "--teacher-cache", "vocab"]).teacher_cache == 0
    assert parse(["demo", "--teacher-cache", "head"]).teacher_cache == "head"
    with pytest.raises(SystemExit):
        parse(["demo", "--teacher-cache", "0"])

    def plan(k):
        settings = demo_settings(quick=True)
        settings.methods, settings.teacher_cache_k = ("all",), k
        pipeline = DemoPipeline(settings, "unused", echo=lambda _: None)
        return pipeline.teacher_cache_methods(), pipeline.cache_settings()

    (served, live), stored = plan(0)
    assert set(live) == {"mta", "sra"} and "sft" not in served and {"dskd", "dwakd", "alm", "uld"} <= set(served)
    assert stored["k"] == 0 and 1.0 in stored["temperatures"] and 2.0 in stored["temperatures"]
    (served, live), stored_topk = plan(64)  # raw logit rows (alm, multilevel_ot) need a lossless cache
    assert stored["tail_rank"] == 0 and stored_topk["tail_rank"] == 32  # the builder's default rank-R tail for top-K
    assert set(live) == {"mta", "sra", "alm", "multilevel_ot"} and {"dskd", "dwakd", "uld"} <= set(served)
    assert "hidden states" in live["sra"] and "lossless" not in live["alm"]
    (served, live), stored = plan("head")  # every logit, recomputed: the raw-logit methods are served
    assert set(live) == {"mta", "sra"} and {"alm", "multilevel_ot", "dskd"} <= set(served) and stored["k"] == "head"


def test_a_method_missing_its_optional_dependency_is_known_before_anything_trains(tmp_path: Path):
    """MTA's spaCy pipeline is checked first: named with --methods it stops the run before the suite is written;
    with `all` it is left out, said, and recorded as not run (the pipeline name below is never installed)."""
    from dwakd.config import ConfigError
    from dwakd.demo.pipeline import DemoPipeline, run_demo
    from dwakd.demo.settings import demo_settings

    settings = demo_settings(quick=True)
    settings.method_options = {**settings.method_options, "mta": {"spacy_pipeline": "dwakd_no_such_pipeline"}}
    with pytest.raises(ConfigError, match="dwakd_no_such_pipeline"):
        run_demo(tmp_path / "named", settings=settings, methods=["sft", "mta"], show_progress=False,
                 echo=lambda _: None)
    assert not (tmp_path / "named" / "data").exists()

    said: list[str] = []
    settings.methods = ("all",)
    pipeline = DemoPipeline(settings, tmp_path / "all", echo=said.append, keep_going=True)
    assert "mta" in pipeline.methods
    pipeline.check_method_requirements()
    assert "mta" not in pipeline.methods and {"sft", "dskd", "dwakd", "sra"} <= set(pipeline.methods)
    assert "not run" in pipeline.log.failed["mta"] and "dwakd_no_such_pipeline" in pipeline.log.failed["mta"]
    assert any(line.strip().startswith("mta: not run") for line in said)


def test_demo_quick_teacher_cache_reproduces_the_live_teacher(tmp_path: Path, capsys):
    """`dwakd demo --quick --teacher-cache vocab` after a live-teacher quick run in the same folder: the teacher and
    the teacher-free students are reused, the distilled students retrain from the lossless cache (never reusing the
    live ones) with the live run's losses at every step; sra, which a cache cannot serve, keeps its live students."""
    import yaml

    from dwakd.cli import main
    from dwakd.demo.pipeline import run_demo
    from dwakd.demo.settings import LIVE_TEACHER

    out = tmp_path / "demo"
    methods = ["sft", "dskd", "dwakd", "sra"]
    live = run_demo(out, quick=True, methods=methods, show_progress=False, echo=lambda _: None,
                    teacher_cache_k=LIVE_TEACHER)
    assert not live.log.teacher_cache and not (out / "teacher_cache").exists()
    distilled = [f"{m}-seed{s}" for m in ("dskd", "dwakd") for s in (0, 1)]
    live_losses = {name: _step_losses(out / "students" / name) for name in distilled}
    assert all(len(steps) == 10 for steps in live_losses.values())

    assert main(["demo", "--quick", "--no-progress", "--output", str(out), "--methods", ",".join(methods),
                 "--teacher-cache", "vocab"]) == 0
    printed = capsys.readouterr().out
    assert "the cache cannot serve sra" in printed and "| DWA-KD |" in printed
    assert yaml.safe_load((out / "demo_config.yaml").read_text())["teacher_cache_k"] == 0
    manifest = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    assert manifest["state"] == "complete" and manifest["settings"]["k"] is None  # lossless
    for name in distilled:
        config = yaml.safe_load((out / "students" / name / "dwakd_config.yaml").read_text())
        assert config["teacher"]["cache"] == str(out / "teacher_cache"), name
        steps = _step_losses(out / "students" / name)
        assert [e["step"] for e in steps] == [e["step"] for e in live_losses[name]] == list(range(1, 11))
        for ours, theirs in zip(steps, live_losses[name]):  # the loss, its named parts, stats, grad norm
            assert set(ours) == set(theirs) and {"loss", "ce", "grad_norm"} <= set(ours)
            for key in set(theirs) - {"step", "epoch"}:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=LOGGED_UNIT), (name, key, ours["step"])
    for name in ("sra-seed0", "sft-seed0"):
        config = yaml.safe_load((out / "students" / name / "dwakd_config.yaml").read_text())
        assert not (config.get("teacher") or {}).get("cache"), name

    timings = json.loads((out / "timings.json").read_text())
    cache = timings["teacher_cache"]
    assert cache["served"] == ["dskd", "dwakd"] and list(cache["live"]) == ["sra"] and cache["examples"] > 0
    report = (out / "report.md").read_text()
    assert "read a lossless teacher cache" in report and "SRA trained with the live teacher" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ↳ ")}
    assert rows["↳ build teacher cache (lossless)"].rstrip().endswith("| no |")  # built in this run, timed
    for reused in ("teacher", "sft-seed0", "sra-seed1"):
        assert "| yes (trained in" in rows[f"↳ train {reused}"], reused
    for retrained in distilled:
        assert rows[f"↳ train {retrained}"].rstrip().endswith("| no |"), retrained

    # once more with the cache: every stage is reused, the cache too
    again = run_demo(out, quick=True, methods=methods, show_progress=False, echo=lambda _: None, teacher_cache_k=0)
    assert all(again.cached[stage] for stage in ("teacher", "teacher cache", "dskd-seed0", "dwakd-seed1", "sra-seed0"))

    # a head-mode cache (no logits stored; the head recomputes them): a new cache, the live run's losses again
    head = run_demo(out, quick=True, methods=methods, show_progress=False, echo=lambda _: None,
                    teacher_cache_k="head")
    assert not head.cached["teacher cache"] and head.cached["teacher"] and head.cached["sra-seed0"]
    manifest = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    assert manifest["settings"]["logits"] == "head" and manifest["sizes"]["logit_bytes_per_token"] == 0
    for name in distilled:
        assert not head.cached[name], name
        for ours, theirs in zip(_step_losses(out / "students" / name), live_losses[name], strict=True):
            for key in set(theirs) - {"step", "epoch"}:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=LOGGED_UNIT), (name, key, ours["step"])
    assert "read a head-mode teacher cache" in (out / "report.md").read_text()


def test_tokenizer_training_is_deterministic(tmp_path: Path):
    """Same corpus, same settings -> byte-identical tokenizers (the demo caches and compares runs by them)."""
    texts = S.corpus_text(S.build_suite(tmp_path / "data", S.SuiteSizes(train=800, student_train=10, dev=2, test=2)))
    settings = TokenizerSettings(teacher_vocab=900, student_vocab=600)
    first = train_tokenizers(texts, settings, tmp_path / "a")
    second = train_tokenizers(texts, settings, tmp_path / "b")
    for role in ("teacher", "student"):
        assert (first[role] / "tokenizer.json").read_bytes() == (second[role] / "tokenizer.json").read_bytes()


def test_threads_follow_free_cores(monkeypatch):
    from dwakd.demo import pipeline as P

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(P.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setattr(P, "_cpu_busy_fraction", lambda: 0.05)
    assert P.choose_threads() == 2
    monkeypatch.setattr(P, "_cpu_busy_fraction", lambda: 0.5)  # another process holds one core
    assert P.choose_threads() == 1
    monkeypatch.setattr(P, "_cpu_busy_fraction", lambda: 1.0)
    assert P.choose_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert P.choose_threads() == 3


# ---- statistics and ranking logic -----------------------------------------------------------------------------
def test_paired_t_test_against_closed_forms_and_scipy():
    """One-sided paired t-test: the t density with 1 and 2 degrees of freedom has closed-form tails."""
    import math

    from scipy import stats

    from dwakd.evaluation.stats import paired_comparison

    # the three DWA-KD - DSKD differences: +0.41, +0.80, +1.21
    a, b = [35.0, 36.0, 37.5], [34.59, 35.2, 36.29]
    c = paired_comparison(a, b)
    d = [0.41, 0.80, 1.21]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    assert c.n == 3 and c.diffs == pytest.approx(d)
    assert c.mean_diff == pytest.approx(mean) and c.std_err == pytest.approx(sd / math.sqrt(3))
    assert c.t == pytest.approx(t) and c.t == pytest.approx(3.49, abs=0.01)  # the issue rounded d: t = 3.47
    assert c.p_value == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)))  # Student t, 2 dof: P(T > t)
    assert 0.03 < c.p_value < 0.05 and c.holds()
    assert not paired_comparison(b, a).holds() and paired_comparison(b, a).p_value == pytest.approx(1 - c.p_value)

    two = paired_comparison([3.0, 5.0], [1.0, 2.0])  # d = 2, 3: t = 5 with 1 dof
    assert two.t == pytest.approx(5.0)
    assert two.p_value == pytest.approx(0.5 - math.atan(5.0) / math.pi)
    assert not two.holds()  # p = 0.063, and fewer than three seeds anyway
    assert not paired_comparison([3.0, 5.0, 9.0], [1.0, 2.0, 3.0]).holds(min_pairs=4)

    rng = __import__("random").Random(0)
    a = [rng.gauss(0, 1) for _ in range(7)]
    b = [x - 0.3 + rng.gauss(0, 0.5) for x in a]
    ref = stats.ttest_rel(a, b, alternative="greater")
    assert paired_comparison(a, b).p_value == pytest.approx(ref.pvalue)


def test_paired_comparison_edge_cases():
    from dwakd.evaluation.stats import paired_comparison

    one = paired_comparison([2.0], [1.0])
    assert one.t is None and one.p_value is None and not one.holds(min_pairs=1)
    same_gain = paired_comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every seed +1 exactly
    assert same_gain.p_value == 0.0 and same_gain.holds()
    tie = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert tie.p_value == 1.0 and not tie.holds()
    assert json.dumps(same_gain.to_dict())  # infinite t serialises
    with pytest.raises(ValueError):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_comparison([], [])


def _synthetic_table(student_avgs: dict[str, list[float]], teacher: float, sampling_noise: float = 0.0):
    """Evaluation table with rows `teacher` and `<method>-seed<k>`: two sampling seeds whose mean is the given
    per-training-seed score on every split (±sampling_noise around it)."""
    from dwakd.evaluation.report import ScoreTable

    table = ScoreTable([(name, title) for name, (title, _) in S.TEST_SPLITS.items()])
    rows = {"teacher": [teacher]} | {f"{m}-seed{k}": [v] for m, values in student_avgs.items()
                                     for k, v in enumerate(values)}
    for row, (value,) in rows.items():
        for offset, split in enumerate(S.TEST_SPLITS):
            shift = (offset - 1.5) * 0.5  # splits differ, their mean is the given value
            table.add(row, split, 10, value + shift + sampling_noise)
            table.add(row, split, 20, value + shift - sampling_noise)
    return table


def test_ranking_checks_use_paired_training_seeds_not_sampling_spread():
    from dwakd.demo.report import (
        claim_pairs,
        ranking_checks,
        sampling_seed_margins,
        sampling_seed_table,
        seed_scores,
    )

    methods = ["sft", "dskd", "dwakd"]
    # DWA-KD beats DSKD at every training seed by a small margin; the seeds themselves vary a lot, and each
    # training run's sampling seeds disagree by ±3 — unpaired or sampling-seed spreads would call this a tie.
    full = _synthetic_table({"sft": [31.0, 34.5, 32.0], "dskd": [30.0, 35.0, 33.0], "dwakd": [30.6, 35.5, 33.7]},
                            teacher=40.0, sampling_noise=3.0)
    scores = seed_scores(full, methods, (0, 1, 2))
    assert scores.values("dskd", [0, 1, 2]) == pytest.approx([30.0, 35.0, 33.0])  # mean over sampling seeds, splits
    assert scores.values("teacher", [0, 1, 2]) == pytest.approx([40.0] * 3)
    checks = {(c.better, c.worse): c for c in ranking_checks(scores)}
    assert list(checks) == [("teacher", "dwakd"), ("dwakd", "dskd"), ("dskd", "sft")]
    assert checks[("dwakd", "dskd")].holds and checks[("dwakd", "dskd")].comparison.diffs == pytest.approx(
        [0.6, 0.5, 0.7])
    assert checks[("teacher", "dwakd")].holds
    assert not checks[("dskd", "sft")].holds  # -1, +0.5, +1: mixed
    margins = sampling_seed_margins(sampling_seed_table(full, methods, 0), [("dwakd", "dskd")])
    assert margins[0]["margin"] == pytest.approx(0.6) and margins[0]["spread"] > 3  # descriptive only

    # the same differences over two seeds are not enough
    few = seed_scores(full, methods, (0, 1))
    assert not any(c.holds for c in ranking_checks(few))
    # a method missing from the chain closes the gap: Teacher > DSKD > SFT
    assert claim_pairs(["teacher", "sft", "dskd"]) == [("teacher", "dskd"), ("dskd", "sft")]
    # a training seed a method lacks is left out of its pairs (not compared with another seed's score)
    partial = _synthetic_table({"dskd": [30.0, 35.0, 33.0], "dwakd": [30.6, 35.5]}, teacher=40.0)
    partial_scores = seed_scores(partial, ["dskd", "dwakd"], (0, 1, 2))
    assert partial_scores.compare("dwakd", "dskd").n == 2


def test_tables_label_methods_with_their_titles():
    """Rows are labelled as the papers write the methods (each class's `title`, a preset's own), not by registry
    names; every built-in method has one, and an unknown name is shown as it is."""
    from dwakd.demo.report import display_name
    from dwakd.methods import get_method, method_names, method_title

    assert [display_name(m) for m in ("teacher", "dskd-cma-ga", "sra", "dwakd-nogate", "dwakd-ref")] == \
        ["Teacher", "DSKD-CMA-GA", "SRA", "DWA-KD w/o gate", "DWA-KD (ref. code)"]
    builtin = [m for m in method_names() if get_method(m)[0].__module__.startswith("dwakd.methods.")]
    assert len(builtin) >= 18 and all(method_title(m) != m for m in builtin)
    titles = [method_title(m) for m in builtin]
    assert len(set(titles)) == len(titles)
    assert display_name("not-a-method") == "not-a-method"


def test_paper_and_ablation_tables():
    from dwakd.demo.report import (
        ablation_methods,
        ablation_table,
        paper_table,
        seed_scores,
    )

    methods = ["sft", "dskd", "dwakd", "dwakd-ew", "dwakd-nogate", "uld"]
    assert ablation_methods(methods) == ["dwakd-ew", "dwakd-nogate"]
    assert ablation_methods(["sft", "dskd"]) == []
    full = _synthetic_table({"sft": [31.0, 32.0, 33.0], "dskd": [32.0, 33.0, 34.0], "dwakd": [33.0, 34.1, 35.2],
                             "dwakd-ew": [32.5, 33.5, 34.6], "dwakd-nogate": [33.0, 34.0, 35.0],
                             "uld": [31.5, 32.6, 33.4]}, teacher=40.0)
    scores = seed_scores(full, methods, (0, 1, 2))
    table = paper_table(full, scores, methods)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(rows) == ["Teacher †", "SFT", "DSKD", "DWA-KD", "DWA-KD w/ EW", "DWA-KD w/o gate", "ULD"]
    assert "+1.10 ± 0.06" in rows["DWA-KD"] and rows["DSKD"].count("|") == rows["SFT"].count("|")
    ablations = ablation_table(scores, ablation_methods(methods))
    labels = [line.split("|")[1].strip() for line in ablations.splitlines()[2:]]
    assert labels == ["DSKD", "DWA-KD w/ EW", "DWA-KD w/o gate", "DWA-KD"]
    assert "-0.57 ± 0.03" in ablations  # w/ EW vs DWA-KD: -0.5, -0.6, -0.6


# ---- data, caching, structure ---------------------------------------------------------------------------------
def test_in_domain_test_and_dev_share_no_record_with_training():
    train = S.generate_split("train", 6000)
    keys = {(r["instruction"], r["input"]) for r in train}
    test, dev = S.generate_split("test", 120), S.generate_split("dev", 120)
    test_keys, dev_keys = ({(r["instruction"], r["input"]) for r in rows} for rows in (test, dev))
    assert not test_keys & keys and not dev_keys & keys and not test_keys & dev_keys
    assert len(test_keys) >= 115  # repeats only where a family has too few distinct questions (tips)
    assert {S.pool(*k) for k in keys} == {"train"}
    # the facts asked in the test set still occur in training under another phrasing
    countries = {r["instruction"].split(" of ")[-1].rstrip("?.") for r in train if r["family"] == "capital"}
    asked = [r["instruction"].split(" of ")[-1].rstrip("?.") for r in test if r["family"] == "capital"]
    assert asked and sum(c in countries for c in asked) >= len(asked) - 1


def test_every_test_split_has_a_dev_split_drawn_like_it_that_shares_no_record_with_it(tmp_path: Path):
    assert set(S.DEV_SPLITS.values()) == set(S.TEST_SPLITS)
    sizes = S.SuiteSizes(train=2000, student_train=100, dev=100, test=100, dev_ood=100)
    paths = S.build_suite(tmp_path, sizes)
    stats = S.suite_stats(paths)
    for dev, test in S.DEV_SPLITS.items():
        dev_rows, test_rows = S.read_jsonl(paths[dev]), S.read_jsonl(paths[test])
        dev_keys, test_keys = ({(r["instruction"], r["input"]) for r in rows} for rows in (dev_rows, test_rows))
        assert not dev_keys & test_keys, dev
        assert stats[dev]["in_test"] == 0.0 and stats[dev]["in_train"] == 0.0
        assert len(dev_rows) == 100 and len(dev_keys) >= 90  # distinct questions, like the test split's
        # drawn from the test split's distribution: its families and about its lengths
        assert set(stats[dev]["families"]) == set(stats[test]["families"])
        for field in ("input_words", "answer_words"):
            assert abs(stats[dev][field] - stats[test][field]) <= 0.15 * stats[test][field], (dev, field)
    assert set(stats["dev_tasks"]["families"]) == set(S.UNSEEN_FAMILIES)
    assert stats["dev_long"]["input_words"] > 1.3 * stats["dev"]["input_words"]


def test_the_test_splits_are_the_ones_every_recorded_result_was_measured_on():
    """The README's and benchmarks/results' demo numbers were measured on these exact test records; a change to the
    suite's generators that moves them (e.g. drawing a dev split from a test split's stream) must be deliberate."""
    import hashlib

    pinned = {"test": "0200e12ef2a02f08", "ood_phrasing": "e7e4f8a202fe334d", "ood_long": "434c9550d9017f68",
              "ood_tasks": "827f3865667759cd"}
    for split, digest in pinned.items():
        text = json.dumps(S.generate_split(split, 100))
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, split


def test_code_fingerprint_covers_the_code_that_computes_stages(tmp_path: Path, monkeypatch):
    import shutil

    import dwakd
    from dwakd.demo import pipeline as P

    copy = tmp_path / "dwakd"
    shutil.copytree(Path(dwakd.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    monkeypatch.setattr(dwakd, "__file__", str(copy / "__init__.py"))
    base = P.code_fingerprint()
    (copy / "demo" / "report.py").write_text((copy / "demo" / "report.py").read_text() + "\n# wording\n")
    assert P.code_fingerprint() == base  # presentation only
    for module in ("demo/tokenizers.py", "trainer.py", "methods/dwakd.py", "evaluation/generation.py"):
        path = copy / module
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        assert P.code_fingerprint() != base, module
        path.write_text(original)
    assert P.code_fingerprint() == base
    monkeypatch.setattr(P, "library_versions", lambda: {"torch": "0.0"})
    assert P.code_fingerprint() != base


def test_a_worker_ends_when_the_demo_process_is_killed(tmp_path):
    """A killed demo leaves no worker training on: `exit_with_parent` ends a process whose parent is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent_code = f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import os, time
from dwakd.demo.pipeline import exit_with_parent
exit_with_parent(os.getppid(), interval=0.1)
open({str(pid_file)!r}, "w").write(str(os.getpid()))
time.sleep(60)
'''])
while not os.path.exists({str(pid_file)!r}):
    time.sleep(0.05)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "the child never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)  # no cleanup runs in the parent
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its killed parent by 10 s")


def test_stage_keys_survive_moving_the_demo_folder(tmp_path: Path):
    """A copied or moved demo folder keeps its cached stages: no stage key holds a path inside the output folder."""
    import shutil

    from dwakd.demo.pipeline import DemoPipeline
    from dwakd.demo.settings import demo_settings

    def job_keys(folder: Path, k: int | None = 64, steps: int | None = None) -> dict[str, str]:
        settings = demo_settings(quick=True)
        settings.teacher_cache_k = k
        if steps is not None:
            settings.student_training = {**settings.student_training, "max_steps": steps}
        pipe = DemoPipeline(settings, folder, show_progress=False, echo=lambda line: None)
        data = pipe.build_data()
        tokenizers = pipe.build_tokenizers(data)
        return {job.label: job.key for job in pipe.training_jobs(data, tokenizers)}

    first = job_keys(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    moved = job_keys(tmp_path / "elsewhere" / "b")
    assert "teacher" in first and len(first) > 3
    assert moved == first
    changed = job_keys(tmp_path / "elsewhere" / "b", steps=11)  # a setting still changes the students' keys
    assert changed["teacher"] == first["teacher"]
    assert all(changed[label] != first[label] for label in first if "seed" in label)


def test_an_interrupted_training_stage_stops_the_demo_and_a_rerun_continues_it(tmp_path: Path, monkeypatch):
    """Ctrl-C / SIGTERM during a training stage: the trainer saves a checkpoint, the demo stops (it used to mark the
    half-trained stage finished and go on), and the same command continues that stage from its checkpoint."""
    import dwakd.run
    from dwakd.demo.pipeline import STAGE_FILE, DemoInterrupted, run_demo
    from dwakd.trainer import SaveOnInterrupt

    original = SaveOnInterrupt.on_step_end
    fired: list[int] = []

    def interrupt_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3 and not fired:  # as the signal handler would, during the teacher's 4th step
            fired.append(state.global_step)
            self.requested = True
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(SaveOnInterrupt, "on_step_end", interrupt_at_step_3)
    options = dict(quick=True, methods=["sft"], train_seeds=[0], eval_seeds=[10], show_progress=False,
                   echo=lambda _: None, workers=1)
    out = tmp_path / "demo"
    with pytest.raises(DemoInterrupted, match="teacher: interrupted at step 3"):
        run_demo(out, **options)
    marker = json.loads((out / "teacher" / STAGE_FILE).read_text())
    assert marker.get("in_progress") is True
    assert (out / "teacher" / "checkpoint-3").is_dir()
    assert not (out / "students").exists()  # nothing after the teacher ran

    resumed: list[str | None] = []
    original_resolve = dwakd.run.resolve_resume
    monkeypatch.setattr(dwakd.run, "resolve_resume", lambda *a: resumed.append(original_resolve(*a)) or resumed[-1])
    result = run_demo(out, **options)
    assert result.report.is_file()
    assert resumed[0] is not None and resumed[0].endswith("checkpoint-3")  # the teacher continued, not restarted
    marker = json.loads((out / "teacher" / STAGE_FILE).read_text())
    assert "in_progress" not in marker and marker["global_step"] == 30


def test_generations_of_a_copied_demo_folder_are_pointed_at_the_copy(tmp_path: Path):
    """A copied demo folder's saved generations name the old folder's model and test set in meta.json (which the
    evaluation checks before reusing them): they are pointed at the copy's own, and nothing else is touched."""
    from dwakd.demo.pipeline import DemoPipeline
    from dwakd.demo.settings import demo_settings

    old, new = tmp_path / "a" / "demo", tmp_path / "b" / "demo-copy"
    folder = new / "eval" / "generations" / "sft-seed0"
    stored = {"test": {"model": str(old / "students" / "sft-seed0"), "dataset": str(old / "data" / "test.jsonl"),
                       "settings": "abc"},
              "ood_long": {"model": "/elsewhere/students/dskd-seed0", "dataset": str(old / "data" / "ood_long.jsonl"),
                           "settings": "abc"}}
    for name, meta in stored.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "meta.json").write_text(json.dumps(meta))
    pipe = DemoPipeline(demo_settings(quick=True), new, show_progress=False, echo=lambda line: None)
    datasets = [(name, str(new / "data" / f"{name}.jsonl"), name) for name in stored]
    pipe.relocate_generations(new / "eval", {"sft-seed0": new / "students" / "sft-seed0"}, datasets)
    test = json.loads((folder / "test" / "meta.json").read_text())
    assert test == {"model": str(new / "students" / "sft-seed0"), "dataset": str(new / "data" / "test.jsonl"),
                    "settings": "abc"}
    ood = json.loads((folder / "ood_long" / "meta.json").read_text())
    assert ood["model"] == "/elsewhere/students/dskd-seed0"  # another model's generations: still refused later
    assert ood["dataset"] == str(new / "data" / "ood_long.jsonl")
