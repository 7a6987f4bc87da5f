"""`dwakd` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dwakd import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from dwakd.config import load_config
    from dwakd.run import train

    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("training.disable_tqdm=true")
    config = load_config(args.config, overrides)
    result = train(config, show_progress=not args.no_progress)
    if result.get("interrupted"):
        print(f"interrupted at step {result['global_step']}; checkpoint saved in {result['output_dir']}; "
              "continue with training.resume_from_checkpoint=last")
        return 130
    print(f"trained {result['global_step']} steps, mean train loss {result['train_loss']:.4f}; "
          f"student and method state in {result['output_dir']}")
    return 0


def _cmd_data_dolly(args: argparse.Namespace) -> int:
    from dwakd.data.dolly import prepare_dolly

    prepare_dolly(args.out, args.source, revision=args.revision, allow_missing=args.allow_missing)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from dwakd.methods import method_names

    print("\n".join(method_names()))
    return 0


# Modules that add their own subcommands with `register(subparsers)`; missing ones are skipped.
_EXTENSIONS = ("dwakd.evaluation.cli", "dwakd.demo.cli", "dwakd.teacher_cache.cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="dwakd", description="Cross-tokenizer knowledge distillation for LLMs.")
    parser.add_argument("--version", action="version", version=f"dwakd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a student with a distillation method from a YAML config")
    p.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides such as method=dwakd output_dir=runs/x training.max_steps=50")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="prepare a benchmark data set")
    data = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    d = data.add_parser("dolly", help="the papers' Dolly split (11,435 train / 1,000 dev / 500 test) from "
                                      "databricks-dolly-15k: train.jsonl, dev.jsonl, valid.jsonl")
    d.add_argument("--out", default="data/dolly", help="output folder (default: data/dolly)")
    d.add_argument("--source", default="databricks/databricks-dolly-15k",
                   help="a `datasets` hub name (default), a local databricks-dolly-15k.jsonl, or a local folder")
    d.add_argument("--revision", default=None, help="hub revision of the data set")
    d.add_argument("--allow-missing", action="store_true",
                   help="write the files even if some dev/test records of the papers' split are not in the data")
    d.set_defaults(func=_cmd_data_dolly)

    p = sub.add_parser("methods", help="list the registered distillation methods")
    p.set_defaults(func=_cmd_methods)

    for name in _EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dwakd` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train cfg.yaml --no-progress method=dwakd`)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from dwakd.config import ConfigError
    from dwakd.data import DataError
    from dwakd.methods.registry import UnknownMethodError

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, UnknownMethodError) as exc:
        print(f"dwakd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
