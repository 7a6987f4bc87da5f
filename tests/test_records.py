"""Record loading and validation: every malformed-input class gives an error naming file, line and field."""

from __future__ import annotations

import json

import pytest

from dwakd.data.records import (
    PROMPT_NO_INPUT,
    DataError,
    LoadReport,
    build_prompt,
    load_records,
    split_records,
)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_prompt_template_is_spec_exact():
    assert build_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert build_prompt("Summarise.", "Some text") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise.\n\n"
        "### Input:\nSome text\n\n### Response:\n"
    )
    assert build_prompt("x", "   ") == PROMPT_NO_INPUT.format(instruction="x")


def test_formats_dolly_alpaca_prompt_output(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps({"instruction": "I1", "context": "C1", "response": "R1"}),
        json.dumps({"instruction": "I2", "input": "", "output": ["A", "B"]}),
        json.dumps({"prompt": "P3", "output": "O3"}),
        "",
    ])
    records = load_records(path)
    assert [r.prompt for r in records] == [build_prompt("I1", "C1"), build_prompt("I2"), "P3"]
    assert records[1].references == ("A", "B") and records[1].response == "A"
    assert [r.line for r in records] == [1, 2, 3]


@pytest.mark.parametrize(
    "line, field, problem",
    [
        ('{"instruction": "x", "output": "y"', None, "invalid JSON"),
        ('["not", "an", "object"]', None, "expected a JSON object"),
        ('{"instruction": "x"}', "output", "missing"),
        ('{"instruction": "x", "output": ""}', "output", "is empty"),
        ('{"instruction": "x", "output": "  \\n"}', "output", "is empty"),
        ('{"instruction": "x", "output": 3}', "output", "expected a string, got int"),
        ('{"instruction": "x", "output": []}', "output", "empty list"),
        ('{"instruction": "x", "output": ["ok", ""]}', "output[1]", "is empty"),
        ('{"instruction": "", "output": "y"}', "instruction", "is empty"),
        ('{"instruction": ["x"], "output": "y"}', "instruction", "expected a string"),
        ('{"output": "y"}', "instruction", "missing"),
        ('{"instruction": "x", "input": 5, "output": "y"}', "input", "expected a string"),
    ],
)
def test_malformed_rows_name_file_line_field(tmp_path, line, field, problem):
    path = write_lines(tmp_path / "bad.jsonl", ['{"instruction": "ok", "output": "fine"}', line])
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    assert err.source == str(path) and err.line == 2 and err.field_name == field
    assert problem in str(err) and f"{path}, line 2" in str(err)


def test_skip_invalid_reports_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        '{"instruction": "a", "output": "b"}', "{oops", '{"instruction": "c", "output": ""}',
        '{"instruction": "d", "output": "e"}',
    ])
    report = LoadReport()
    records = load_records(path, skip_invalid=True, report=report)
    assert [r.instruction for r in records] == ["a", "d"]
    assert [line for _, line, _ in report.skipped] == [2, 3]
    assert "skipped 2 invalid row(s)" in report.summary() and "d.jsonl:2" in report.summary()


def test_missing_file_and_all_invalid(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    path = write_lines(tmp_path / "e.jsonl", ["{bad"])
    with pytest.raises(DataError, match="no valid records"):
        load_records(path, skip_invalid=True)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(path)


def test_directory_with_split_and_datasets_format(tmp_path):
    write_lines(tmp_path / "train.jsonl", ['{"instruction": "a", "output": "b"}'])
    assert load_records(tmp_path)[0].instruction == "a"
    import datasets

    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_list([{"instruction": "q", "output": "r"}, {"instruction": "s", "output": ""}]).to_parquet(
        str(pq / "train.parquet"))
    with pytest.raises(DataError) as info:
        load_records(str(pq))
    assert info.value.line == 2 and info.value.field_name == "output"
    assert [r.instruction for r in load_records(str(pq), skip_invalid=True)] == ["q"]


def test_split_is_deterministic_and_disjoint(tmp_path):
    lines = [json.dumps({"instruction": f"i{k}", "output": "o"}) for k in range(50)]
    records = load_records(write_lines(tmp_path / "s.jsonl", lines))
    a = split_records(records, {"dev": 10, "test": 0.2, "train": -1}, seed=3)
    b = split_records(records, {"dev": 10, "test": 0.2, "train": -1}, seed=3)
    c = split_records(records, {"dev": 10, "test": 0.2, "train": -1}, seed=4)
    assert {k: [r.line for r in v] for k, v in a.items()} == {k: [r.line for r in v] for k, v in b.items()}
    assert [r.line for r in a["dev"]] != [r.line for r in c["dev"]]
    assert (len(a["dev"]), len(a["test"]), len(a["train"])) == (10, 10, 30)
    seen = [r.line for part in a.values() for r in part]
    assert sorted(seen) == list(range(1, 51))
    with pytest.raises(ValueError):
        split_records(records, {"a": 40, "b": 20})
