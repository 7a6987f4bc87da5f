"""`dwakd demo`: the embedded end-to-end demo (no downloads, CPU, minutes); `--quick` for a smoke run."""

from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated method names")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _cache_k(text: str) -> int | str:
    """`--teacher-cache K`: top-K logits (K ≥ 1), 'vocab' (0: lossless, every logit) or 'head' (logits recomputed from
    the cached final hidden state)."""
    if text == "vocab":
        return 0
    if text == "head":
        return "head"
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"K must be a whole number ≥ 1, 'vocab' (lossless) or 'head', "
                                         f"got {text!r}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from dwakd.demo.pipeline import DemoInterrupted, run_demo
    from dwakd.demo.settings import LIVE_TEACHER

    methods = args.methods
    if args.table == "paper":
        methods = ["all"]
    default_output = "runs/demo-quick" if args.quick else "runs/demo"  # the table run reuses the default run's models
    teacher_cache_k = LIVE_TEACHER if args.live_teacher else args.teacher_cache
    try:
        result = run_demo(args.output or default_output, quick=args.quick, methods=methods, eval_seeds=args.seeds,
                          train_seeds=args.train_seeds, force=args.force, show_progress=not args.no_progress,
                          workers=args.workers, teacher_cache_k=teacher_cache_k, teacher_steps=args.teacher_steps,
                          student_steps=args.student_steps)
    except DemoInterrupted as stop:
        print(f"dwakd demo: stopped: {stop}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports an interrupted command
    return 0 if result.report.is_file() else 1


def register(subparsers) -> None:
    """Add the `demo` subcommand to the `dwakd` parser."""
    p = subparsers.add_parser(
        "demo", help="build a suite and two tokenizers, train a teacher and students, evaluate, print a Table 1",
        description="End-to-end cross-tokenizer distillation on CPU with nothing to download: a generated "
                    "instruction suite, a byte-level BPE teacher tokenizer and a WordPiece student tokenizer, a "
                    "Llama teacher (sft) and GPT-2 students (each method, same initialisation), sampled "
                    "evaluation with ROUGE-L. Stages are cached in the output folder, so a rerun reuses them.")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke version of the same pipeline (well under 2 minutes)")
    p.add_argument("--output", metavar="DIR", help="output folder (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--methods", type=_name_list, metavar="M1,M2",
                   help="student methods (default sft,dskd,dwakd; `all`: every registered method, see `dwakd methods`)")
    p.add_argument("--table", choices=["paper"],
                   help="paper: every registered method (the ablations included) -> Table 1 and Table 3 analogues "
                        "(same as --methods all; in runs/demo it reuses the teacher and students of `dwakd demo`)")
    p.add_argument("--seeds", type=_int_list, metavar="S1,S2",
                   help="sampling seeds of the evaluation (default 10,20,30)")
    p.add_argument("--train-seeds", type=_int_list, metavar="S1,S2",
                   help="students' training seeds; the claims are paired t-tests over them (default 0,1,2)")
    p.add_argument("--teacher-steps", type=_positive, metavar="N",
                   help="the teacher's training steps (default 500; fewer are faster and give a weaker teacher)")
    p.add_argument("--student-steps", type=_positive, metavar="N",
                   help="every student's training steps (default 1200, at batch 8; fewer are faster and, in our "
                        "measurements, put the distilled students behind SFT: see the README)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="parallel worker processes for training and evaluation (default: one per free core; 1: none)")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher-cache", nargs="?", const="head", type=_cache_k, metavar="K",
                         help="the distilled students read the teacher from a cache built once after it is trained "
                              "(`dwakd teacher-cache`): 'head' (the default: logits recomputed from the cached final "
                              "hidden state, exact), top-K logits plus a rank-32 tail (K ≥ 1, approximate) or "
                              "'vocab' (lossless, every logit); methods a cache cannot serve (mta, sra; alm and "
                              "multilevel_ot with a top-K cache) train with the live teacher")
    teacher.add_argument("--live-teacher", action="store_true",
                         help="the distilled students run the teacher at every step (no cache; slower)")
    p.add_argument("--force", action="store_true", help="rebuild every stage instead of reusing cached ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
