"""How often two tokenizers disagree on token boundaries over the same responses (what sequence alignment must bridge).

Per pair of tokenizers and data file, over each record's first reference response (no special tokens):
- `student_boundaries_also_teacher`: fraction of the student's token end offsets (characters) that are also a
  teacher token's end offset — 1.0 means every student token ends where some teacher token ends, so a monotone
  alignment can pair them exactly (many-to-one at worst); the rest fall inside a teacher token;
- `teacher_boundaries_also_student`: the same the other way round;
- `student_over_teacher_tokens`: how many more (or fewer) tokens the student needs for the same text.
End offsets, not spans, are compared: tokenizers differ in whether a word's leading space belongs to its token.

    PYTHONPATH=src python benchmarks/token_boundaries.py \\
        --pair builtin:gpt2,builtin:qwen --data data/dolly-tiny/train.jsonl \\
        --pair runs/demo/tokenizers/student,runs/demo/tokenizers/teacher \\
        --data runs/demo/data/student_train.jsonl --out benchmarks/results/token_boundaries.json

Every `--pair` is measured on every `--data` file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dwakd.data.records import load_records  # noqa: E402
from dwakd.tokenizers import load_tokenizer  # noqa: E402


def end_offsets(tokenizer, text: str) -> list[int]:
    """Character end offset of every token of `text` (no special tokens)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [end for _, end in encoding["offset_mapping"]]


def boundary_agreement(student, teacher, texts: list[str]) -> dict[str, float | int]:
    """Boundary statistics of two tokenizers over `texts` (see the module docstring)."""
    s_tokens = t_tokens = s_ends = t_ends = shared = 0
    for text in texts:
        s, t = end_offsets(student, text), end_offsets(teacher, text)
        s_set, t_set = set(s), set(t)
        s_tokens, t_tokens = s_tokens + len(s), t_tokens + len(t)
        s_ends, t_ends, shared = s_ends + len(s_set), t_ends + len(t_set), shared + len(s_set & t_set)
    return {"texts": len(texts), "student_tokens": s_tokens, "teacher_tokens": t_tokens,
            "student_over_teacher_tokens": s_tokens / max(1, t_tokens),
            "student_boundaries_also_teacher": shared / max(1, s_ends),
            "teacher_boundaries_also_student": shared / max(1, t_ends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", action="append", required=True, help="STUDENT,TEACHER tokenizer specs")
    parser.add_argument("--data", action="append", required=True, help="instruction JSONL (first reference used)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for data in args.data:
        texts = [record.references[0] for record in load_records(data)]
        for pair in args.pair:
            student_spec, _, teacher_spec = pair.partition(",")
            if not teacher_spec:
                parser.error(f"--pair {pair!r}: expected STUDENT,TEACHER")
            stats = boundary_agreement(load_tokenizer(student_spec), load_tokenizer(teacher_spec), texts)
            results.append({"student": student_spec, "teacher": teacher_spec, "data": data, **stats})
            print(f"{student_spec} vs {teacher_spec} on {data}: student ends shared "
                  f"{stats['student_boundaries_also_teacher']:.3f}, teacher ends shared "
                  f"{stats['teacher_boundaries_also_student']:.3f}, "
                  f"tokens s/t {stats['student_over_teacher_tokens']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
