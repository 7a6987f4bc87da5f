"""`dwakd data dolly`: the papers' Dolly split from a local copy of databricks-dolly-15k (offline).

tests/data/dolly-raw-mini.jsonl holds 12 rows in Dolly's raw format: 4 of MiniLLM's test split and 4 of DSKD's dev
split (dev ones in the reverse of the published order), 3 others, and one whose prompt is too long.
tests/data/dolly-expected/ holds those 8 records' lines copied byte for byte from the published files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dwakd.cli import main
from dwakd.data import DataError, load_records
from dwakd.data.dolly import (
    MAX_PROMPT_TOKENS,
    load_dolly,
    prepare_dolly,
    prompt_lengths,
    read_manifest,
    split_manifest,
)

DATA = Path(__file__).parent / "data"
RAW = DATA / "dolly-raw-mini.jsonl"
EXPECTED = DATA / "dolly-expected"


def _quiet(*args):
    pass


def test_shipped_manifest_has_the_papers_dev_and_test_membership(tmp_path):
    manifest = read_manifest()
    assert len(manifest["valid"]) == 500 and len(manifest["dev"]) == 1000
    assert len(set(manifest["valid"]) | set(manifest["dev"])) == 1500
    # the expected files' records are in it, in the published order
    (tmp_path / "own.txt").write_text(split_manifest(EXPECTED / "dev.jsonl", EXPECTED / "valid.jsonl"))
    own = read_manifest(tmp_path / "own.txt")
    assert own["valid"] == manifest["valid"][:2] + [manifest["valid"][2], manifest["valid"][4]]
    assert own["dev"] == manifest["dev"][:4]


def test_writes_the_published_format_order_and_filter(tmp_path):
    split = prepare_dolly(tmp_path / "out", RAW, allow_missing=True, cache_dir=str(tmp_path / "cache"), echo=_quiet)
    out = tmp_path / "out"
    # dev and test: byte-identical to the published lines, in the published (manifest) order
    assert (out / "dev.jsonl").read_bytes() == (EXPECTED / "dev.jsonl").read_bytes()
    assert (out / "valid.jsonl").read_bytes() == (EXPECTED / "valid.jsonl").read_bytes()
    # train: the rest in Dolly order, text stripped, whitespace-only context -> the no-input prompt
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in train] == [
        "Who founded Amazon?", "How many cents do I have if I have 3 dimes?",
        "What is the name of the flag carrier airline of the Netherlands?"]
    assert list(train[1]) == ["instruction", "prompt", "input", "output"]
    assert train[1]["input"] == "" and train[1]["output"] == "If you have 3 dimes, you have 30 cents."
    assert train[1]["prompt"].endswith(
        "### Instruction:\nHow many cents do I have if I have 3 dimes?\n\n### Response:\n")
    assert "### Input:" not in train[1]["prompt"]
    # the long row is dropped by the GPT-2 prompt-length filter (and only it)
    raw = load_dolly(RAW, cache_dir=str(tmp_path / "cache"))
    lengths = prompt_lengths(raw)
    assert split.too_long == 1 == sum(n > MAX_PROMPT_TOKENS for n in lengths)
    assert max(n for n in lengths if n <= MAX_PROMPT_TOKENS) < MAX_PROMPT_TOKENS < lengths[4]
    assert {k: len(v) for k, v in split.missing.items()} == {"valid": 496, "dev": 996}
    # dwakd reads what it wrote
    records = load_records(str(out / "train.jsonl"))
    assert len(records) == 3 and records[0].response == "Jeff Bezos"


def test_complete_manifest_needs_no_flag_and_missing_records_stop(tmp_path, capsys):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(split_manifest(EXPECTED / "dev.jsonl", EXPECTED / "valid.jsonl"))
    lines = []
    split = prepare_dolly(tmp_path / "a", RAW, manifest_file=manifest, cache_dir=str(tmp_path / "c"), echo=lines.append)
    assert not split.missing and {k: len(v) for k, v in split.splits.items()} == {"valid": 4, "dev": 4, "train": 3}
    assert (tmp_path / "a" / "dev.jsonl").read_bytes() == (EXPECTED / "dev.jsonl").read_bytes()
    assert any("dev.jsonl: 4 records" in line and "the papers have 1000" in line for line in lines)
    with pytest.raises(DataError, match="496 of 500 valid, 996 of 1000 dev records of the papers' split"):
        prepare_dolly(tmp_path / "b", RAW, cache_dir=str(tmp_path / "c"), echo=_quiet)
    assert not (tmp_path / "b").exists()


def test_cli_data_dolly(tmp_path, capsys):
    out = tmp_path / "dolly"
    assert main(["data", "dolly", "--source", str(RAW), "--out", str(out)]) == 2
    assert "--allow-missing" in capsys.readouterr().err and not out.exists()
    assert main(["data", "dolly", "--source", str(RAW), "--out", str(out), "--allow-missing"]) == 0
    printed = capsys.readouterr().out
    assert "1 dropped (prompt over 256 GPT-2 tokens)" in printed and "valid.jsonl: 4 records" in printed
    assert sorted(p.name for p in out.iterdir()) == ["dev.jsonl", "train.jsonl", "valid.jsonl"]
    # `dwakd eval --data-root` finds the test split where `dwakd data dolly --out ROOT/dolly` put it
    from dwakd.evaluation.datasets import load_eval_datasets

    (dolly,) = load_eval_datasets(["dolly"], tmp_path)
    assert dolly.spec.source == str(out / "valid.jsonl") and len(dolly.records) == 4


def test_bad_rows_name_the_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "response": "b", "category": "x"}\n'
                   '{"instruction": "a", "context": "", "response": "  ", "category": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, field 'response': is empty"):
        load_dolly(bad, cache_dir=str(tmp_path / "cache"))


def test_missing_dolly_file_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match=r"file not found; `dwakd data dolly --out .*dolly` makes the papers'"):
        load_records(str(tmp_path / "data" / "dolly" / "train.jsonl"))
