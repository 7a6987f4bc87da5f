"""`dwakd eval | judge | similarity | bench` subcommands: parse arguments, call the evaluation library, print."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the `dwakd` parser."""
    _add_eval(subparsers)
    _add_judge(subparsers)
    _add_similarity(subparsers)
    try:
        from dwakd.evaluation import efficiency
    except ImportError:  # the bench needs the trainer; without it the other commands still work
        return
    efficiency.register_cli(subparsers)


def _fail(command: str, exc: Exception) -> int:
    print(f"dwakd {command}: error: {exc}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------- eval
def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="sampled ROUGE-L over seeds and test sets (docs/methods.md), resumable; writes a Table-1 report",
        description="Generate with the papers' protocol for every model x test set x seed, score ROUGE-L and "
                    "write report.md/.csv/.png. Rerunning with the same --out-dir resumes.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a checkpoint dir (full or LoRA adapter) or hub name; repeat for several rows")
    p.add_argument("--dataset", action="append", default=None, metavar="DATASET",
                   help="ALIAS[:LIMIT] (dolly, selfinst, vicuna, sni; needs --data-root) or NAME=PATH[:LIMIT]; "
                        "repeatable; default: the four paper sets under --data-root")
    p.add_argument("--data-root", help="folder in MiniLLM's data layout: dolly/valid.jsonl (`dwakd data dolly "
                                       "--out ROOT/dolly`), self-inst/, vicuna/, sinst/11_/")
    p.add_argument("--limit", type=int, help="use the first N items of every test set without its own limit")
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: max-length - max-prompt-length, the reference code's budget")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=6)
    p.add_argument("--out-dir", default="eval", help="generations and report files go here (default: eval)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="discard earlier generations in --out-dir")
    p.add_argument("--title", help="title printed above the table")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from dwakd.evaluation.datasets import PAPER_DATASETS, load_eval_datasets
    from dwakd.evaluation.generation import GenerationSettings
    from dwakd.evaluation.report import write_report
    from dwakd.evaluation.runner import parse_model_spec, run_evaluation

    try:
        models = dict(parse_model_spec(m) for m in args.model)
        if len(models) != len(args.model):
            raise ValueError("model names must be unique")
        specs = args.dataset or (list(PAPER_DATASETS) if args.data_root else None)
        if not specs:
            raise ValueError("give --dataset DATASET (repeatable) or --data-root for the four paper test sets")
        datasets = load_eval_datasets(specs, args.data_root, args.limit)
        settings = GenerationSettings(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            no_repeat_ngram_size=args.no_repeat_ngram_size, max_prompt_length=args.max_prompt_length,
            max_length=args.max_length, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        started = time.perf_counter()
        table = run_evaluation(models, datasets, args.out_dir, seeds=args.seeds, settings=settings,
                               dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                               progress=not args.no_progress, overwrite=args.overwrite, write_files=False)
        paths = write_report(table, args.out_dir, title=args.title)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("eval", exc)
    sizes = ", ".join(f"{d.name} {len(d.records)}" for d in datasets)
    print(f"ROUGE-L (x100, mean ± std over seeds {' '.join(map(str, args.seeds))}; items: {sizes}; "
          f"{time.perf_counter() - started:.1f} s)")
    print(table.to_markdown(title=args.title))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---------------------------------------------------------------------------------------------- judge
def _add_judge(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "judge", help="pairwise LLM judge (paper §4.3) of two models' responses via an OpenAI-compatible API",
        description="Compare two generation files (e.g. eval/generations/<model>/dolly/seed10.jsonl) on N "
                    "sampled items. The API key is read from an environment variable only.")
    p.add_argument("--first", required=True, metavar="NAME=RESPONSES.jsonl", help="win/tie/loss are this model's")
    p.add_argument("--second", required=True, metavar="NAME=RESPONSES.jsonl")
    p.add_argument("--base-url", required=True, help="e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4.1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--n-items", type=int, default=100)
    p.add_argument("--sample-seed", type=int, default=0, help="which items are judged")
    p.add_argument("--order-seed", type=int, default=0, help="A/B order per item")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each time)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--out", required=True, help="verdicts JSONL (appended; a rerun skips judged items)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_judge)


def _named_file(text: str) -> tuple[str, str]:
    if "=" not in text:
        return Path(text).parent.parent.name or Path(text).stem, text
    name, path = text.split("=", 1)
    return name.strip(), path.strip()


def _cmd_judge(args: argparse.Namespace) -> int:
    from dwakd.evaluation.judge import ChatClient, JudgeError, load_responses, run_judge

    try:
        (n1, p1), (n2, p2) = _named_file(args.first), _named_file(args.second)
        client = ChatClient(args.base_url, args.judge_model, api_key_env=args.api_key_env,
                            temperature=args.temperature, max_retries=args.max_retries, backoff=args.backoff,
                            timeout=args.timeout)
        summary = run_judge((n1, load_responses(p1)), (n2, load_responses(p2)), client, args.out,
                            n_items=args.n_items, sample_seed=args.sample_seed, order_seed=args.order_seed,
                            progress=not args.no_progress)
    except (ValueError, FileNotFoundError, JudgeError) as exc:
        return _fail("judge", exc)
    summary_path = Path(args.out).with_suffix(".summary.json")
    summary_path.write_text(json.dumps({**summary.to_dict(), "judge_model": args.judge_model,
                                        "sample_seed": args.sample_seed, "order_seed": args.order_seed},
                                       indent=2), encoding="utf-8")
    print(summary.format())
    print(f"verdicts in {args.out}; summary in {summary_path}")
    return 0


# ----------------------------------------------------------------------------------------- similarity
def _add_similarity(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "similarity", help="teacher/student structure-matrix distances (paper Appendix B) with box plots",
        description="For each text, cosine and normalised inner-product structure matrices of the final hidden "
                    "states of teacher and each student; L1 distances; box plots per method.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint dir or hub name")
    p.add_argument("--student", action="append", required=True, metavar="NAME=PATH", help="repeat per method")
    p.add_argument("--data", required=True, metavar="PATH[:LIMIT]", help="JSONL/dir/datasets name with responses")
    p.add_argument("--split", default="train", help="split when --data is a directory or `datasets` name")
    p.add_argument("--limit", type=int, default=100, help="number of texts (paper: 100; appendix: 1000)")
    p.add_argument("--max-chars", type=int, default=256, help="characters kept of prompt and of response")
    p.add_argument("--out-dir", default="similarity")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_similarity)


def _cmd_similarity(args: argparse.Namespace) -> int:
    import re

    from dwakd.data.records import load_records
    from dwakd.evaluation.runner import default_device, parse_model_spec
    from dwakd.evaluation.similarity import measure_similarity, texts_from_records, write_similarity_report
    from dwakd.models import load_model_for_inference

    try:
        match = re.match(r"^(.*):(\d+)$", args.data)
        source, limit = (match.group(1), int(match.group(2))) if match else (args.data, args.limit)
        records = load_records(source, split=args.split)[:limit]
        device = args.device or default_device()

        def load(path: str):
            return load_model_for_inference(path, dtype=args.dtype, device=device,
                                            trust_remote_code=args.trust_remote_code)

        teacher = load(args.teacher)
        students = {name: load(path) for name, path in (parse_model_spec(s) for s in args.student)}
        results = measure_similarity(teacher, students, texts_from_records(records, args.max_chars),
                                     progress=not args.no_progress)
        paths = write_similarity_report(results, args.out_dir, {"teacher": args.teacher, "data": source,
                                                                "texts": len(records), "max_chars": args.max_chars})
    except (ValueError, FileNotFoundError) as exc:
        return _fail("similarity", exc)
    print(paths["markdown"].read_text(encoding="utf-8"), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
