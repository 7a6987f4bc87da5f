"""ROUGE-L against direct rouge_score calls; test-set specs on the real MiniLLM files; the Table-1 report."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from dwakd.evaluation.datasets import load_eval_datasets, parse_dataset_spec
from dwakd.evaluation.report import ScoreTable, write_report
from dwakd.evaluation.rouge import mean_rouge_l, rouge_l

PAPER_SETS = Path(__file__).resolve().parent / "data" / "paper-sets"  # first 3 rows of each paper test set

PAIRS = [
    ("The cats are running in the garden.", "A cat runs in the garden."),
    ("Paris", ["London is big.", "The capital is Paris.", "paris"]),
    ("", "Nothing was generated."),
    ("Completely unrelated words here", ["Alpha beta.", "Gamma delta epsilon."]),
    ("Water boils at 100 degrees Celsius at sea level.",
     ["Water boils at 100 °C.", "At sea level, water boils at 100 degrees."]),
]


def _direct(prediction, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = [references] if isinstance(references, str) else references
    return 100 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in refs)


def test_rouge_l_equals_direct_rouge_score():
    for prediction, references in PAIRS:
        assert rouge_l(prediction, references) == pytest.approx(_direct(prediction, references), abs=1e-12)
    # Max over references, not the first one; stemming on ("cats"/"cat", "running"/"runs").
    assert rouge_l("Paris", ["London is big.", "paris"]) == pytest.approx(100.0)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(PAIRS[0][1], PAIRS[0][0])
    assert rouge_l(*PAIRS[0]) > 100 * unstemmed["rougeL"].fmeasure
    want = statistics.fmean(_direct(p, r) for p, r in PAIRS)
    assert mean_rouge_l([p for p, _ in PAIRS], [r for _, r in PAIRS]) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])


def test_dataset_specs(tmp_path):
    spec = parse_dataset_spec("sni:7", "/data")
    assert (spec.name, spec.source, spec.limit, spec.display) == ("sni", "/data/sni/11_/valid.jsonl", 7, "S-NI")
    spec = parse_dataset_spec("mine=some/dir/test.jsonl:12")
    assert (spec.name, spec.source, spec.limit, spec.display) == ("mine", "some/dir/test.jsonl", 12, "mine")
    assert parse_dataset_spec("x=/a/b.jsonl").limit is None
    spec = parse_dataset_spec("hub=org/set@test:5")
    assert (spec.source, spec.split, spec.limit) == ("org/set", "test", 5)
    for bad in ["dolly", "unknown", "bad name=x.jsonl", "x=", "x=a.jsonl:0"]:
        with pytest.raises(ValueError):
            parse_dataset_spec(bad)


def test_paper_test_sets_load_with_list_references():
    sets = load_eval_datasets(["dolly:2", "selfinst", "vicuna", "sni"], PAPER_SETS, limit=3)
    assert [d.spec.display for d in sets] == ["Dolly", "SelfInst", "Vicuna", "S-NI"]
    assert [len(d.records) for d in sets] == [2, 3, 3, 3]
    sni = sets[3].records
    assert any(len(r.references) > 1 for r in sni)  # S-NI rows carry several references
    assert all(r.prompt.endswith("### Response:\n") for d in sets for r in d.records)
    with pytest.raises(ValueError, match="unique"):
        load_eval_datasets(["dolly:1", "dolly:2"], PAPER_SETS)


def test_score_table_matches_naive_statistics(tmp_path):
    table = ScoreTable([("dolly", "Dolly"), ("sni", "S-NI")])
    scores = {"sft": {"dolly": [20.0, 22.0, 21.0], "sni": [10.0, 14.0, 12.5]},
              "dwakd": {"dolly": [24.0, 25.5, 23.0], "sni": [19.0, 20.0, 18.0]},
              "partial": {"dolly": [30.0]}}
    for model, per in scores.items():
        for dataset, values in per.items():
            for seed, value in zip([10, 20, 30], values):
                table.add(model, dataset, seed, value)
    sft = table.cell("sft", "sni")
    assert (sft.mean, sft.std, sft.n) == (pytest.approx(12.1666666667), pytest.approx(statistics.stdev([10, 14, 12.5])),
                                          3)
    avg = table.average("dwakd")
    per_seed = [(a + b) / 2 for a, b in zip(scores["dwakd"]["dolly"], scores["dwakd"]["sni"])]
    assert avg.mean == pytest.approx(statistics.fmean(per_seed))
    assert avg.std == pytest.approx(statistics.stdev(per_seed))
    assert table.average("partial") is None and table.cell("partial", "dolly").std == 0.0

    markdown = table.to_markdown()
    lines = markdown.strip().splitlines()
    assert lines[0] == "| Method | Dolly | S-NI | Avg. |"
    assert lines[3] == (f"| dwakd | {statistics.fmean(scores['dwakd']['dolly']):.2f} ± "
                        f"{statistics.stdev(scores['dwakd']['dolly']):.2f} | 19.00 ± 1.00 | "
                        f"{avg.mean:.2f} ± {avg.std:.2f} |")
    assert lines[4] == "| partial | 30.00 | – | – |"

    paths = write_report(table, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == ["sft", "dwakd", "partial"]
    assert float(rows[0]["S-NI mean"]) == pytest.approx(sft.mean, abs=1e-4)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    again = ScoreTable.from_json(__import__("json").loads(paths["json"].read_text()))
    assert again.to_markdown() == markdown
