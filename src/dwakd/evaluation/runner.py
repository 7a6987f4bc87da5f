"""`dwakd eval` as a library call: every model x test set x seed -> resumable generations -> ROUGE-L -> report.

Output layout under `out_dir`:
    generations/<model>/<dataset>/seed<seed>.jsonl   one row per item (instruction, references, response, ...)
    generations/<model>/<dataset>/meta.json          model source, test set source and decoding settings
    report.md, report.csv, report.png, results.json  the Table-1-style summary (see `report.py`)
A rerun with the same settings resumes: finished items are never generated again, and a model whose
generations are all complete is not even loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dwakd.evaluation.datasets import EvalDataset
from dwakd.evaluation.generation import (
    PROTOCOL_SEEDS,
    GenerationSettings,
    encode_prompts,
    generate_seed_file,
    missing_items,
    read_generation_file,
)
from dwakd.evaluation.report import ScoreTable
from dwakd.evaluation.rouge import mean_rouge_l

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ModelSource = str | tuple[Any, Any]  # a path / hub name, or an already loaded (model, tokenizer)


def parse_model_spec(text: str) -> tuple[str, str]:
    """`name=path` -> (name, path); a bare path is named after its last component."""
    if "=" in text:
        name, path = (part.strip() for part in text.split("=", 1))
    else:
        path = text.strip()
        name = Path(path.rstrip("/")).name or path
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.', '+' (it names output folders)")
    if not path:
        raise ValueError(f"model spec {text!r}: empty path")
    return name, path


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_file(out_dir: str | Path, model: str, dataset: str, seed: int) -> Path:
    """Where the generations of one (model, test set, seed) live."""
    return Path(out_dir) / "generations" / model / dataset / f"seed{seed}.jsonl"


def _meta(source: ModelSource, dataset: EvalDataset, settings: GenerationSettings) -> dict:
    return {
        "model": source if isinstance(source, str) else "<loaded in memory>",
        "dataset": dataset.spec.source,
        "settings": settings.fingerprint(),
    }


def _check_meta(folder: Path, meta: dict, overwrite: bool) -> None:
    """Refuse to mix generations made with other settings, another model or another test set (unless overwrite)."""
    meta_path = folder / "meta.json"
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        in_memory = not isinstance(meta["model"], str) or meta["model"].startswith("<")
        diff = sorted(k for k in meta if old.get(k) != meta[k] and not (k == "model" and in_memory))
        if diff:
            raise ValueError(
                f"{folder} holds generations made with a different {', '.join(diff)} "
                f"(stored: { {k: old.get(k) for k in diff} }); use another --out-dir or --overwrite"
            )
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def score_rows(rows: Sequence[dict]) -> float:
    """Mean ROUGE-L (x100, max over references) of generation rows."""
    return mean_rouge_l([r["response"] for r in rows], [r["references"] for r in rows])


DEFAULT_SETTINGS = GenerationSettings()  # the papers' protocol (frozen, so one shared default is safe)


def run_evaluation(
    models: Mapping[str, ModelSource],
    datasets: Sequence[EvalDataset],
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = PROTOCOL_SEEDS,
    settings: GenerationSettings = DEFAULT_SETTINGS,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    write_files: bool = True,
    on_batch_done: Callable[[int], None] | None = None,
) -> ScoreTable:
    """Generate (resuming) and score every model on every test set for every seed; write the report files."""
    if not models:
        raise ValueError("no models to evaluate")
    if not datasets:
        raise ValueError("no test sets to evaluate on")
    if not seeds:
        raise ValueError("no seeds")
    out_dir = Path(out_dir)
    table = ScoreTable([(d.name, d.spec.display) for d in datasets])
    for name, source in models.items():
        for dataset in datasets:
            _check_meta(out_dir / "generations" / name / dataset.name, _meta(source, dataset, settings), overwrite)
        pending = {(d.name, s) for d in datasets for s in seeds
                   if missing_items(seed_file(out_dir, name, d.name, s), len(d.records))}
        model = tokenizer = None
        if pending:
            model, tokenizer = _load(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            check_context_length(model, settings, name)
        started = time.perf_counter()
        for dataset in datasets:
            n = len(dataset.records)
            prompt_ids = None
            for seed in seeds:
                path = seed_file(out_dir, name, dataset.name, seed)
                if (dataset.name, seed) in pending:
                    if prompt_ids is None:
                        prompt_ids = encode_prompts(tokenizer, dataset.records, settings.max_prompt_length)
                    rows = generate_seed_file(model, tokenizer, dataset.records, seed, path, settings,
                                              prompt_ids=prompt_ids, progress=progress,
                                              desc=f"{name}/{dataset.name}/seed{seed}", on_batch_done=on_batch_done)
                else:
                    done = read_generation_file(path)
                    rows = [done[i] for i in range(n)]
                table.add(name, dataset.name, seed, score_rows(rows))
            logger.info("%s on %s: %s", name, dataset.name, table.cell(name, dataset.name).format())
        if pending:
            logger.info("%s: generated in %.1f s", name, time.perf_counter() - started)
        del model  # free it before the next model is loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if write_files:
        from dwakd.evaluation.report import write_report

        write_report(table, out_dir)
    return table


def check_context_length(model: Any, settings: GenerationSettings, name: str = "model") -> None:
    """Fail early when prompt + new tokens exceed the model's position table (e.g. a tiny GPT-2 with 256)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    need = settings.max_prompt_length + settings.new_tokens
    if positions is not None and positions < need:
        raise ValueError(
            f"{name}: the model has {positions} positions, but prompts of up to {settings.max_prompt_length} tokens "
            f"plus {settings.new_tokens} new tokens need {need}; lower --max-prompt-length / --max-length"
        )


def _load(source: ModelSource, *, dtype: str | None, device: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: a path/hub name via `dwakd.models`, or a loaded pair moved to `device`."""
    device = device or default_device()
    if isinstance(source, str):
        from dwakd.models import load_model_for_inference

        return load_model_for_inference(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model, tokenizer = source
    return model.to(device).eval(), tokenizer
