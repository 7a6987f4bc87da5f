"""`dwakd teacher-cache CONFIG [key=value ...] --out DIR`: run the teacher once and store what methods read."""

from __future__ import annotations

import argparse
import sys


def _k(text: str) -> int | str | None:
    if text.lower() in ("vocab", "all", "lossless"):
        return None
    if text.lower() == "head":
        return "head"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes a positive integer, 'vocab' or 'head', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--k must be ≥ 1, got {value}")
    return value


def _numbers(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return parse


def _cmd_teacher_cache(args: argparse.Namespace) -> int:
    from dwakd.config import load_config
    from dwakd.teacher_cache import CacheSettings, TeacherCacheError, build_teacher_cache, verify_cache
    from dwakd.teacher_cache.format import logit_mode

    if args.verify:
        problems = verify_cache(args.out)
        print("\n".join(problems) if problems else f"{args.out}: every file matches its manifest")
        return 1 if problems else 0
    if args.config is None:
        print("dwakd teacher-cache: error: give a CONFIG (or --verify)", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    config = load_config(args.config, overrides)
    try:
        settings = CacheSettings(k=args.k, value_bits=args.value_bits, hidden=not args.no_hidden,
                                 layers=args.layers or (), hidden_dtype=args.hidden_dtype,
                                 temperatures=args.temperatures, tail_rank=args.tail_rank,
                                 batch_size=args.batch_size, shard_mb=args.shard_mb)
        manifest = build_teacher_cache(config, args.out, settings, show_progress=not args.no_progress,
                                       overwrite=args.overwrite)
    except (TeacherCacheError, ValueError) as exc:
        print(f"dwakd teacher-cache: error: {exc}", file=sys.stderr)
        return 2
    sizes, s = manifest.get("sizes", {}), manifest["settings"]
    exact = "exact" if s["lossless"] else "not exact"
    mode = {"full": "lossless (every logit)",
            "head": f"head mode (logits recomputed from the final hidden state; {exact})",
            "topk": f"top-{s['k']} + {'rank-' + str(s['tail_rank']) if s.get('tail_rank') else 'flat'} tail "
                    f"at τ ∈ {s['temperatures']}"}[logit_mode(s)]
    print(f"teacher cache in {args.out}: {manifest['examples']['unique']} examples, {sizes.get('rows', '?')} teacher "
          f"tokens, {mode}, hidden layers {s['layers']} as {s['hidden_dtype']}; "
          f"{sizes.get('logit_bytes_per_token')} B/token logits + {sizes.get('hidden_bytes_per_token')} B/token "
          f"hidden; build {manifest['build_seconds']:.1f} s. Train with teacher.cache={args.out}")
    return 0


def register(subparsers) -> None:
    """Add `dwakd teacher-cache` to the `dwakd` parser."""
    p = subparsers.add_parser(
        "teacher-cache", help="run the teacher once over a config's data and store its outputs for training",
        description="Runs the config's teacher over its train and eval data (its own tokenization) and stores, per "
                    "teacher response token, the top-k logits with the tail mass (or every logit with --k vocab, or no "
                    "logits with --k head: training recomputes them from the final hidden state) and hidden states, "
                    "plus its embedding table and LM head. Train with teacher.cache=DIR: the teacher "
                    "is then never built. A killed build resumes when rerun with the same arguments. "
                    "See docs/teacher-cache.md.")
    p.add_argument("config", nargs="?", help="the run's YAML config (teacher, data, lengths, method)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for `dwakd train`")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created; resumed if it holds a "
                   "partial build of the same settings)")
    p.add_argument("--k", type=_k, default=64, metavar="K", help="top-k logits per token (default 64); 'vocab': "
                   "lossless, every logit; 'head': no logits, recomputed in training from the cached final hidden "
                   "state with the cached LM head (exact with --hidden-dtype auto; 2·d to 4·d bytes per token)")
    p.add_argument("--value-bits", type=int, default=13, help="bits per top-k value code (6..15; default 13)")
    p.add_argument("--layers", type=_numbers(int), metavar="I,J", help="extra hidden_states layers to store "
                   "(the final one is always stored; layers the config's method declares are added)")
    p.add_argument("--no-hidden", action="store_true", help="do not store the final hidden state")
    p.add_argument("--hidden-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8"],
                   help="storage of hidden states (auto: exact in lossless and head mode, float16 otherwise)")
    p.add_argument("--temperatures", type=_numbers(float), metavar="T1,T2",
                   help="temperatures at which the tail mass is stored (default 1, 2 and the method's)")
    p.add_argument("--tail-rank", type=int, default=None, metavar="R",
                   help="top-k caches: store R int8 coefficients per token (R + 4 bytes) on a basis of the teacher's "
                        "logits fitted over the first rows of the data, which give the tail its shape (default 32; "
                        "0: one flat tail bucket); see docs/teacher-cache.md#low-rank-tail")
    p.add_argument("--batch-size", type=int, default=8, help="teacher batch size")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MiB")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings in DIR")
    p.add_argument("--verify", action="store_true", help="re-hash every file of DIR against its manifest and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_teacher_cache)
