"""Benchmark: MinED vocabulary-map build for real vocabularies, and the per-step cost of the token alignments.

Measures, for a teacher/student tokenizer pair (default: Qwen 151,646 tokens → GPT-2 50,257 tokens):
- the decoded token tables and the uncached vocabulary-map build (each search stage counted), then a cached load;
- the exact-text (shared) vocabulary DSKDv2 uses;
- per batch of real Dolly examples (dual-tokenized like training: prompt ≤ 256, sequence ≤ 512 tokens):
  MinED's alignment (edit-distance matrices + compiled DTW, per sequence), the exact offset alignment
  (vectorised, whole batch) and the reference's string two-pointer (per sequence);
- one long pair (≈256 × 256 response tokens) for the edit-distance matrix and the DTW alone.

    PYTHONPATH=src python benchmarks/vocab_map.py
    PYTHONPATH=src python benchmarks/vocab_map.py --teacher builtin:qwen --student builtin:gpt2 --batches 10

Writes benchmarks/results/vocab_map.json (or --out). Times are wall-clock seconds on whatever machine runs it;
the JSON records the CPU count and load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dwakd.alignment.dtw import dtw_path, edit_distance_matrix  # noqa: E402
from dwakd.alignment.exact import exact_offset_alignment, exact_string_alignment  # noqa: E402
from dwakd.alignment.token_strings import token_table  # noqa: E402
from dwakd.alignment.vocab_map import build_vocab_map, cached_vocab_map, exact_text_map  # noqa: E402
from dwakd.data.collator import DistillationCollator  # noqa: E402
from dwakd.data.records import load_records  # noqa: E402
from dwakd.data.tokenization import encode_records  # noqa: E402
from dwakd.methods import MethodContext, TokenView, build_method  # noqa: E402
from dwakd.tokenizers import load_tokenizer  # noqa: E402

VIEW_KEYS = ("input_ids", "attention_mask", "labels", "input_offsets", "label_offsets")


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def default_data() -> Path:
    """Dolly's 500-item test set as `dwakd data dolly --out data/dolly` writes it, else the bundled tiny set."""
    dolly = ROOT / "data" / "dolly" / "valid.jsonl"
    return dolly if dolly.is_file() else ROOT / "data" / "dolly-tiny" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="builtin:qwen")
    parser.add_argument("--student", default="builtin:gpt2")
    parser.add_argument("--data", default=str(default_data()))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--workers", type=int, default=-1, help="threads for the brute-force stage (-1: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vocab_map.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_average_start": os.getloadavg(), "torch_threads": torch.get_num_threads()}}

    teacher_tok, t_load = timed(load_tokenizer, args.teacher)
    student_tok, s_load = timed(load_tokenizer, args.student)
    teacher, t_table = timed(token_table, teacher_tok)
    student, s_table = timed(token_table, student_tok)
    report["tokenizers"] = {"teacher": args.teacher, "student": args.student, "teacher_tokens": len(teacher),
                            "student_tokens": len(student), "load_s": [t_load, s_load],
                            "token_table_s": [t_table, s_table]}

    cache_dir = tempfile.TemporaryDirectory()
    vmap, build_s = timed(build_vocab_map, teacher, student, workers=args.workers)
    cached_vocab_map(teacher, student, cache_dir.name, workers=args.workers)  # builds again and stores
    _, load_s = timed(cached_vocab_map, teacher, student, cache_dir.name)
    shared, shared_s = timed(exact_text_map, teacher, student)
    report["vocab_map"] = {"build_s": build_s, "stages": vmap.stats, "cached_load_s": load_s,
                           "mean_distance": float(vmap.distance.mean()),
                           "exact_text_shared_tokens": int((shared >= 0).sum()), "exact_text_map_s": shared_s}
    print(f"vocabulary map {len(teacher)} x {len(student)}: {build_s:.1f} s ({vmap.stats}); cached load {load_s:.2f} s")

    # per-step alignment cost on real batches
    records = load_records(args.data)[: args.batch_size * args.batches]
    examples, _ = encode_records(records, student_tok, teacher_tok, show_progress=False)
    collate = DistillationCollator(student_tok.pad_token_id, teacher_tok.pad_token_id)
    mined = build_method("mined", MethodContext(None, None, student_tok, teacher_tok, None, None, cache_dir.name))
    cache_dir.cleanup()
    rows = []
    for lo in range(0, len(examples), args.batch_size):
        batch = collate(examples[lo : lo + args.batch_size])
        s_view = TokenView(*(batch[k] for k in VIEW_KEYS))
        t_view = TokenView(*(batch[f"teacher_{k}"] for k in VIEW_KEYS))
        _, mined_s = timed(mined.align, s_view, t_view)
        _, offsets_s = timed(exact_offset_alignment, s_view.labels, s_view.label_offsets, s_view.input_offsets,
                             t_view.labels, t_view.label_offsets, t_view.input_offsets)
        s_str, t_str = student.stripped_strings(), teacher.stripped_strings()
        start = time.perf_counter()
        for b in range(s_view.labels.shape[0]):
            s_ids = s_view.labels[b][s_view.label_mask[b]].tolist()
            t_ids = t_view.labels[b][t_view.label_mask[b]].tolist()
            exact_string_alignment([t_str[i] for i in t_ids], [s_str[i] for i in s_ids],
                                   [i == teacher.eos_id for i in t_ids], [i == student.eos_id for i in s_ids])
        strings_s = time.perf_counter() - start
        rows.append({"student_response_tokens": s_view.label_mask.sum(-1).tolist(),
                     "teacher_response_tokens": t_view.label_mask.sum(-1).tolist(),
                     "mined_align_s": mined_s, "exact_offsets_s": offsets_s, "exact_strings_s": strings_s})
    rows = rows[1:] if len(rows) > 1 else rows  # the first batch pays numba's cache load
    summary = {key: statistics.median(r[key] for r in rows) for key in ("mined_align_s", "exact_offsets_s",
                                                                          "exact_strings_s")}
    summary["mean_student_response_tokens"] = statistics.mean(n for r in rows for n in r["student_response_tokens"])
    summary["mean_teacher_response_tokens"] = statistics.mean(n for r in rows for n in r["teacher_response_tokens"])
    report["alignment_per_batch"] = {"batch_size": args.batch_size, "data": args.data, "median": summary,
                                     "batches": rows}
    print(f"per batch of {args.batch_size}: {summary}")

    # one long pair: the two pieces of MinED's per-sequence cost at ~256 x 256
    text = " ".join(r.response for r in load_records(args.data)[:60])
    s_ids = student_tok(text, add_special_tokens=False)["input_ids"][:256]
    t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"][:256]
    s_str, t_str = student.stripped_strings(), teacher.stripped_strings()
    costs, times_ed, times_dtw = None, [], []
    for _ in range(5):
        costs, seconds = timed(edit_distance_matrix, [t_str[i] for i in t_ids], [s_str[i] for i in s_ids])
        times_ed.append(seconds)
        times_dtw.append(timed(dtw_path, costs)[1])
    report["long_pair"] = {"shape": list(costs.shape), "edit_distance_matrix_s": statistics.median(times_ed),
                           "dtw_path_s": statistics.median(times_dtw[1:])}
    print(f"256 x 256: edit distances {report['long_pair']['edit_distance_matrix_s'] * 1e3:.1f} ms, "
          f"DTW {report['long_pair']['dtw_path_s'] * 1e3:.2f} ms")
    report["machine"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
