"""Tests of the embedded demo: the generated suite, the two tokenizers, and `dwakd demo --quick` end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dwakd.demo import suite as S
from dwakd.demo.tokenizers import TokenizerSettings, boundary_agreement, train_tokenizers
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
    from dwakd.cli import main
    from dwakd.demo.pipeline import run_demo
    from dwakd.demo.report import REPORT_SECTIONS

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Teacher |" in printed and "| DWA-KD |" in printed

    for name in ("report.md", "results.md", "results.csv", "results.png", "results.json", "loss_curves.png",
                 "demo_config.yaml", "timings.json", "demo.log", "data/train.jsonl", "data/suite.json",
                 "tokenizers/teacher/tokenizer.json", "tokenizers/student/tokenizer.json", "teacher/model.safetensors",
                 "teacher/trainer_state.json", "teacher/dwakd_config.yaml"):
        assert (out / name).is_file(), name
    for method in ("sft", "dskd", "dwakd"):
        assert (out / "students" / method / "model.safetensors").is_file()
        assert (out / "students" / method / "trainer_state.json").is_file()

    report = (out / "report.md").read_text()
    for section in REPORT_SECTIONS:
        assert section in report
    header = next(line for line in report.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Method", "Suite", "Phrasing", "Long", "Tasks", "Avg."]
    rows = [line for line in report.splitlines() if re.match(r"\| (Teacher|SFT|DSKD|DWA-KD) \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["Teacher", "SFT", "DSKD", "DWA-KD"]
    for row in rows:  # every cell is "mean ± std" over the two sampling seeds
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c) for c in cells), row

    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"Teacher", "SFT", "DSKD", "DWA-KD"}
    assert [d["name"] for d in results["datasets"]] == ["test", "ood_phrasing", "ood_long", "ood_tasks"]
    assert all(len(per_seed) == 2 for model in results["scores"].values() for per_seed in model.values())

    # A rerun reuses every stage (teacher included) and reports the same numbers.
    again = run_demo(out, quick=True, show_progress=False, echo=lambda _: None)
    assert all(again.cached[stage] for stage in ("suite", "tokenizers", "teacher", "sft", "dskd", "dwakd"))
    assert again.table.to_json()["scores"] == results["scores"]


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
