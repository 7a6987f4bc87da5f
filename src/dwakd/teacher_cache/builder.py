"""`dwakd teacher-cache`: run the teacher once over a run config's train and eval data and store what methods read.

The teacher runs exactly as it does inside training — same tokenization (`dwakd.run.load_datasets`), the trainer's
own forward (`DistillationModel._run_side`: LM head deferred to the label rows), the same dtype and autocast — so a
lossless cache reproduces the live teacher's numbers. Per teacher label position it stores the logit part (all
logits, the top k with the tail mass, or nothing in head mode, where training recomputes the logits from the cached
final hidden state) and the hidden states of the cached layers; once per cache the embedding table and LM head
(`dwakd.teacher_cache.format`).

Resumable: the examples (deduplicated by content, train then eval, in dataset order) are cut into shards by a
plan fixed when the build starts; each shard is written to a temporary file and renamed, then the manifest is
rewritten atomically. A killed build rerun with the same arguments checks the fingerprint and settings, drops
partial files, and continues after the last shard the manifest lists; the result is byte-identical to an
uninterrupted build (tests/test_teacher_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch
from tqdm.auto import tqdm

from dwakd.data.collator import collate_side
from dwakd.interface import TokenView
from dwakd.modules.rows import valid_rows
from dwakd.teacher_cache.fingerprint import compute_setup, differences, run_fingerprint
from dwakd.teacher_cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HIDDEN_DTYPES,
    MANIFEST,
    TABLES,
    TeacherCacheError,
    encode_hidden,
    encode_topk,
    id_bits_for,
    logit_mode,
    mmap_safetensors,
    read_manifest,
    shard_name,
    topk_row_bytes,
    write_json_atomic,
)
from dwakd.teacher_cache.reader import example_crc, example_key, label_count

logger = logging.getLogger(__name__)

ROW_CHUNK = 256  # label rows per top-k / log-sum-exp chunk: one (rows, V) float32 temporary at a time
TAIL_FIT_ROWS = 4096  # teacher rows a rank-R tail basis is fitted on: the first rows of the data, in build order
TAIL_FIT_BYTES = 2**30  # ... fewer when their (rows, V) float32 logits would exceed this (1,770 rows at V = 151,646)
DEFAULT_TAIL_RANK = 32  # a top-k cache's tail rank unless asked otherwise (docs/teacher-cache.md#low-rank-tail)
REQUEST_DEFAULTS = {"tail_rank": 0}  # settings older caches were built without, and what they meant


@dataclass
class CacheSettings:
    """What to store. `k=None` (or k ≥ vocabulary) is the lossless mode: every logit, exactly. `k="head"` stores no
    logits: training recomputes them from the cached final hidden state with the cached LM head (exact when the
    hidden state is stored as the teacher computes it, which `hidden_dtype="auto"` does)."""

    k: int | str | None = 64
    value_bits: int = 13  # bits per top-k value code (float16 of −log p, mantissa rounded; 15 = float16)
    hidden: bool = True  # store the final hidden state
    layers: tuple[int, ...] = ()  # more hidden_states indices to store (0 = embedding output; negative from the end)
    hidden_dtype: str = "auto"  # auto: lossless and head -> as the teacher computes them; top-k -> float16
    temperatures: tuple[float, ...] | None = None  # tail masses stored at these τ; None: 1, 2 and the method's τ
    tail_rank: int | None = None  # top-k: the tail's shape from R coefficients per row on a fitted logit basis
    # (0: one flat bucket; None: DEFAULT_TAIL_RANK for a top-k cache, 0 for the others)
    batch_size: int = 8
    shard_mb: float = 256.0

    def __post_init__(self) -> None:
        if isinstance(self.k, str):
            if self.k != "head":
                raise ValueError(f"k must be an integer ≥ 1, 'vocab' (None) or 'head', got {self.k!r}")
            if not self.hidden:
                raise ValueError("k='head' recomputes the teacher's logits from its cached final hidden state, so it "
                                 "cannot be combined with hidden=False (--no-hidden)")
        elif self.k is not None and self.k < 1:
            raise ValueError(f"k must be ≥ 1 (or 'vocab' for the lossless mode, 'head' for head mode), got {self.k}")
        if not 6 <= self.value_bits <= 15:
            raise ValueError(f"value_bits must be in 6..15, got {self.value_bits}")
        if self.hidden_dtype not in ("auto", *HIDDEN_DTYPES):
            raise ValueError(f"hidden_dtype must be auto or one of {', '.join(HIDDEN_DTYPES)}, "
                             f"got {self.hidden_dtype!r}")
        if self.temperatures is not None and any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be > 0, got {self.temperatures}")
        if self.tail_rank is None:
            self.tail_rank = 0 if self.k is None or self.k == "head" else DEFAULT_TAIL_RANK
        if self.tail_rank < 0:
            raise ValueError(f"tail_rank must be ≥ 0, got {self.tail_rank}")
        if self.tail_rank and (self.k is None or self.k == "head"):
            raise ValueError("tail_rank shapes the tail of a top-k cache (--k K); a lossless or head-mode cache has "
                             "no tail")
        if self.batch_size < 1 or self.shard_mb <= 0:
            raise ValueError("batch_size must be ≥ 1 and shard_mb > 0")


class _TeacherRunner:
    """Runs a model through the trainer's own `_run_side` (same head deferral and checks as in training)."""

    def __init__(self) -> None:
        from dwakd.trainer import DistillationModel

        self._impl = DistillationModel
        self.row_logits = True
        # what `_run_side` asks of the method: a cache never stores attention probabilities (methods reading them
        # are refused by `cache_refusal`), so the teacher forward never computes them
        self.method = SimpleNamespace(needs_attentions=False)
        self._head_checked: dict[str, bool | None] = {}

    def _deferred_head(self, side, model):
        return self._impl._deferred_head(self, side, model)

    def _run_side(self, side, model, view, want_hidden, vocab_size):
        return self._impl._run_side(self, side, model, view, want_hidden, vocab_size)


def _autocast(args) -> Any:
    """The autocast context the Trainer applies to the model forward (accelerate's mixed precision)."""
    name = compute_setup(args)["autocast"]
    return torch.autocast(device_type=args.device.type, dtype=getattr(torch, name)) if name else nullcontext()


def default_temperatures(config) -> tuple[float, ...]:
    """1, 2 and the configured method's teacher temperature (where its divergences read the teacher)."""
    temps = {1.0, 2.0}
    try:
        from dwakd.methods import build_options, get_method

        method_cls, _ = get_method(config.method.name)
        temps.add(float(method_cls.teacher_temperature(build_options(config.method.name, config.method.options))))
    except Exception as exc:  # an unknown method only loses its τ; the build still serves 1 and 2
        logger.debug("no teacher temperature from method %s: %s", config.method.name, exc)
    return tuple(sorted(temps))


def method_layers(config) -> tuple[int, ...]:
    try:
        from dwakd.methods import get_method

        return tuple(get_method(config.method.name)[0].teacher_layers)
    except Exception:
        return ()


def _requested(settings: CacheSettings, config) -> dict[str, Any]:
    """The settings as asked (before resolution against the teacher), compared when a build resumes."""
    temps = settings.temperatures if settings.temperatures is not None else default_temperatures(config)
    layers = sorted(set(settings.layers) | set(method_layers(config)))
    return {"k": settings.k, "value_bits": settings.value_bits, "hidden": settings.hidden, "layers": layers,
            "hidden_dtype": settings.hidden_dtype, "temperatures": [float(t) for t in sorted(set(temps))],
            "tail_rank": settings.tail_rank}


def _unique_sides(datasets: dict[str, Any]) -> tuple[list[Any], list[int], dict[str, int]]:
    """Teacher sides of every example, deduplicated by content key, train first; their keys; counts per split."""
    sides, keys, seen, counts = [], [], set(), {}
    for split, dataset in datasets.items():
        counts[split] = 0 if dataset is None else len(dataset)
        for example in dataset.examples if dataset is not None else ():
            key = example_key(example.teacher)
            if key not in seen:
                seen.add(key)
                sides.append(example.teacher)
                keys.append(key)
    return sides, keys, counts


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.name == MANIFEST or path.name == TABLES or path.name.startswith(("shard-", ".shard-", ".tables")):
            path.unlink()


def _damaged(out: Path, manifest: dict[str, Any]) -> bool:
    """Whether a file the manifest lists is missing or has another size."""
    entries = ([manifest["tables"]] if manifest.get("tables") else []) + list(manifest.get("shards", []))
    return any(not (out / e["file"]).is_file() or (out / e["file"]).stat().st_size != e["bytes"] for e in entries)


def _write_atomic(path: Path, data: bytes) -> dict[str, Any]:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class CacheBuilder:
    """One build (or resumed build) of a teacher cache; `run()` does the work and returns the manifest."""

    def __init__(self, config, out_dir: str | Path, settings: CacheSettings | None = None, *,
                 show_progress: bool = True, overwrite: bool = False):
        if config.teacher is None:
            raise TeacherCacheError("the config has no `teacher:` section: there is nothing to cache")
        self.config = config
        self.out = Path(out_dir)
        self.settings = settings or CacheSettings()
        self.show_progress = show_progress
        self.overwrite = overwrite

    def run(self) -> dict[str, Any]:
        from dwakd.models import load_side_tokenizer
        from dwakd.run import load_datasets, training_arguments

        started = time.perf_counter()
        config = self.config
        self.tokenizer = load_side_tokenizer(config.teacher, "teacher")
        self.args = training_arguments(config)
        self.autocast = _autocast(self.args)
        fingerprint = run_fingerprint(config, self.tokenizer, compute_setup(self.args))
        requested = _requested(self.settings, config)
        manifest = self._existing(fingerprint, requested)
        if manifest is not None and manifest.get("state") == "complete":
            if not _damaged(self.out, manifest):
                logger.info("teacher cache %s is complete and matches: nothing to do", self.out)
                return manifest
            manifest["state"] = "building"  # a shard was removed or cut: rebuild from it
        # the teacher tokenizer on both sides: the same example selection and teacher encoding as training
        train, evaluation = load_datasets(config, self.tokenizer, self.tokenizer, self.show_progress)
        sides, keys, counts = _unique_sides({"train": train, "eval": evaluation})
        teacher = self._load_teacher()
        if manifest is None:
            manifest = self._new_manifest(fingerprint, requested, teacher, sides, counts)
        self.manifest = manifest
        self._resume_state()
        self._write_tables(teacher, sides)
        self._build_shards(teacher, sides, keys)
        manifest["state"] = "complete"
        manifest["sizes"] = self._sizes()
        manifest["seconds_this_run"] = round(time.perf_counter() - started, 2)
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest

    # ---- setup -------------------------------------------------------------------------------------------------
    def _existing(self, fingerprint: dict, requested: dict) -> dict | None:
        """The manifest of a matching earlier build to resume or reuse; refuses a different one unless overwriting."""
        if not (self.out / MANIFEST).is_file():
            if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
                raise TeacherCacheError(f"{self.out} exists and is not a teacher cache; choose another --out "
                                        "(or --overwrite to write into it)")
            self.out.mkdir(parents=True, exist_ok=True)
            return None
        manifest = read_manifest(self.out)
        problems = differences(manifest["fingerprint"], fingerprint)
        built = {**REQUEST_DEFAULTS, **manifest["requested"]}
        problems += [f"{key}: cache {built.get(key)}, now {value}" for key, value in requested.items()
                     if built.get(key) != value]
        if not problems:
            return manifest
        if not self.overwrite:
            raise TeacherCacheError(f"{self.out} holds a teacher cache built for something else; "
                                    f"{'; '.join(problems)}. Use another --out, or --overwrite to replace it")
        logger.warning("overwriting the teacher cache in %s (%s)", self.out, "; ".join(problems))
        _clear(self.out)
        return None

    def _load_teacher(self):
        from dwakd.models import load_side_model, prepare_teacher

        teacher = prepare_teacher(load_side_model(self.config.teacher, self.tokenizer, "teacher"), self.config.teacher)
        return teacher.to(self.args.device)

    def _forward(self, teacher, sides) -> tuple[TokenView, Any]:
        batch = collate_side(sides, self.tokenizer.pad_token_id)
        view = TokenView(*(batch[k].to(self.args.device) for k in
                           ("input_ids", "attention_mask", "labels", "input_offsets", "label_offsets")))
        with torch.no_grad(), self.autocast:
            out = self.runner._run_side("teacher", teacher, view, True, len(self.tokenizer))
        return view, out

    def _new_manifest(self, fingerprint, requested, teacher, sides, counts) -> dict[str, Any]:
        """Resolve the settings against the teacher (one probe forward) and fix the shard plan."""
        self.runner = _TeacherRunner()
        vocab = len(self.tokenizer)
        view, out = self._forward(teacher, sides[:1])
        with torch.no_grad(), self.autocast:
            probe_logits = out.logits_at(valid_rows(view.label_mask)[:1])
        num_hidden = len(out.hidden_states)
        final = num_hidden - 1
        hidden_dtype_live = str(out.hidden_states[-1].dtype).replace("torch.", "")
        s = self.settings
        mode = "head" if s.k == "head" else "full" if s.k is None or s.k >= vocab else "topk"
        if mode == "head" and not self.runner._head_checked.get("teacher"):
            raise TeacherCacheError(
                "--k head recomputes the teacher's logits as its LM head applied to its final hidden state, but this "
                "teacher's logits are not that (logit scaling or soft-capping, or its forward takes no "
                "logits_to_keep); build a top-k (--k K) or lossless (--k vocab) cache instead")
        layers = set()
        for layer in requested["layers"]:
            index = layer + num_hidden if layer < 0 else layer
            if not 0 <= index < num_hidden:
                raise TeacherCacheError(f"--layers {layer}: the teacher has hidden_states 0..{final}")
            layers.add(index)
        if s.hidden:
            layers.add(final)
        hidden_dtype = s.hidden_dtype
        if hidden_dtype == "auto":
            hidden_dtype = hidden_dtype_live if (mode != "topk" or hidden_dtype_live != "float32") else "float16"
        # head mode is exact when the head reads the very hidden states the live teacher's head reads
        lossless = mode == "full" or (mode == "head" and hidden_dtype == hidden_dtype_live)
        head = teacher.get_output_embeddings()
        settings = {
            "logits": mode, "lossless": lossless, "k": int(s.k) if mode == "topk" else None,
            "value_bits": s.value_bits,
            "id_bits": id_bits_for(vocab), "layers": sorted(layers), "hidden_dtype": hidden_dtype,
            "temperatures": requested["temperatures"],
            "logits_dtype": str(probe_logits.dtype).replace("torch.", ""),
            "tail_rank": s.tail_rank if mode == "topk" else 0,  # lowered to what the fit supports (_fit_tail_basis)
        }
        info = {"vocab_size": vocab, "head_rows": int(head.weight.shape[0]),
                "hidden_size": int(out.hidden_states[-1].shape[-1]), "num_hidden_states": num_hidden,
                "tied": teacher.get_input_embeddings().weight is head.weight,
                "config": json.loads(teacher.config.to_json_string())}
        row_bytes = self._row_bytes(settings, info)
        plan, rows, target = [], 0, s.shard_mb * 2**20
        for side in sides:
            if plan and rows * row_bytes < target:
                plan[-1] += 1
            else:
                plan.append(1)
                rows = 0
            rows += label_count(side)
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "state": "building",
                    "fingerprint": fingerprint, "requested": requested, "settings": settings, "teacher": info,
                    "examples": {**counts, "unique": len(sides)}, "plan": plan, "tables": None, "shards": [],
                    "build_seconds": 0.0, "build_settings": asdict(self.settings)}
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest

    @staticmethod
    def _row_bytes(settings: dict, info: dict) -> int:
        mode = logit_mode(settings)
        if mode == "head":
            logits = 0
        elif mode == "full":
            logits = info["head_rows"] * (4 if settings["logits_dtype"] == "float32" else 2)
        else:
            logits = topk_row_bytes(settings["k"], settings["value_bits"], settings["id_bits"],
                                    settings.get("tail_rank") or 0)
            logits += 4 * len(settings["temperatures"])
        per_value = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}[settings["hidden_dtype"]]
        hidden = info["hidden_size"] * per_value + (4 if settings["hidden_dtype"] == "int8" else 0)
        return logits + hidden * len(settings["layers"])

    def _resume_state(self) -> None:
        """Drop partial files and any listed shard whose file is missing or has the wrong size (it is rebuilt)."""
        if not hasattr(self, "runner"):
            self.runner = _TeacherRunner()
        for path in self.out.glob(".*.tmp*"):
            path.unlink()
        kept = []
        for shard in self.manifest["shards"]:
            path = self.out / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                logger.warning("teacher cache: %s is missing or cut; rebuilding from it", path)
                break
            kept.append(shard)
        if len(kept) != len(self.manifest["shards"]):
            self.manifest["shards"] = kept
            write_json_atomic(self.out / MANIFEST, self.manifest)
        tables = self.manifest.get("tables")
        if tables and (not (self.out / TABLES).is_file() or (self.out / TABLES).stat().st_size != tables["bytes"]):
            self.manifest["tables"] = None
            if self.manifest["settings"].get("tail_rank") and self.manifest["shards"]:
                # the shards' tail coefficients are on the lost basis; a refit elsewhere may differ in the last bits
                logger.warning("teacher cache: %s is missing or cut; its tail basis is refitted and every shard "
                               "rebuilt", self.out / TABLES)
                self.manifest["shards"] = []
            write_json_atomic(self.out / MANIFEST, self.manifest)
        if self.manifest["shards"]:
            logger.info("teacher cache %s: resuming after %d of %d shards", self.out, len(self.manifest["shards"]),
                        len(self.manifest["plan"]))

    def _write_tables(self, teacher, sides) -> None:
        if self.manifest.get("tables"):
            if self.manifest["settings"].get("tail_rank"):
                self._load_tail_basis()
            return
        embed = teacher.get_input_embeddings().weight.detach().cpu().contiguous()
        head = teacher.get_output_embeddings()
        tensors = {"embed_tokens": embed}
        if not self.manifest["teacher"]["tied"]:
            tensors["lm_head"] = head.weight.detach().cpu().contiguous()
        if getattr(head, "bias", None) is not None:
            tensors["lm_head_bias"] = head.bias.detach().cpu().contiguous()
        if self.manifest["settings"].get("tail_rank"):
            tensors.update(self._fit_tail_basis(teacher, sides))
        self.manifest["tables"] = _write_atomic(self.out / TABLES, save_torch(tensors))
        write_json_atomic(self.out / MANIFEST, self.manifest)

    # ---- rank-R tail -----------------------------------------------------------------------------------------------
    def _fit_tail_basis(self, teacher, sides) -> dict[str, torch.Tensor]:
        """The tail basis: the mean and top principal directions of the teacher's row-centred logits over the first
        rows of the data (randomised SVD with a fixed seed, then orthonormalised in float64); lowers the rank to what
        the rows support."""
        started = time.perf_counter()
        s = self.manifest["settings"]
        x, examples = self._tail_fit_rows(teacher, sides)  # (n, V) row-centred logits
        mean = x.mean(0)
        x -= mean
        q = min(int(s["tail_rank"]) + 16, *x.shape)  # oversampled subspace
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, singular, directions = torch.svd_lowrank(x, q=q, niter=6)  # directions: (V, q)
        rank = min(int(s["tail_rank"]), int((singular > singular[0].clamp_min(1e-30) * 1e-4).sum()))
        if rank < s["tail_rank"]:
            logger.warning("teacher cache: --tail-rank %d lowered to %d, the rank of the teacher's logits over the "
                           "%d rows it is fitted on", s["tail_rank"], rank, x.shape[0])
        s["tail_rank"] = rank
        s["tail_fit"] = {"rows": int(x.shape[0]), "examples": examples}
        tensors: dict[str, torch.Tensor] = {}
        if rank:  # (rank 0: constant rows, nothing to fit; the flat tail)
            basis = torch.linalg.qr(directions[:, :rank].double()).Q.T  # orthonormal rows (R, V)
            signs = basis.gather(1, basis.abs().argmax(1, keepdim=True)).sign()  # largest entry positive: one answer
            tensors = {"tail_mean": mean.contiguous(), "tail_basis": (basis * signs).float().contiguous()}
            self._tail = (tensors["tail_mean"].to(self.args.device), tensors["tail_basis"].to(self.args.device))
        self.manifest["build_seconds"] = round(self.manifest["build_seconds"] + time.perf_counter() - started, 3)
        return tensors

    def _tail_fit_rows(self, teacher, sides) -> tuple[torch.Tensor, int]:
        """Row-centred float32 logits (n, V) of the first `TAIL_FIT_ROWS` label rows (fewer for a large vocabulary),
        and how many examples they came from."""
        vocab = len(self.tokenizer)
        limit = max(2, min(TAIL_FIT_ROWS, TAIL_FIT_BYTES // (4 * vocab)))
        parts, rows, examples = [], 0, 0
        for start in range(0, len(sides), self.settings.batch_size):
            if rows >= limit:
                break
            chunk = sides[start : start + self.settings.batch_size]
            view, out = self._forward(teacher, chunk)
            label_rows = valid_rows(view.label_mask)[: limit - rows]
            for lo in range(0, label_rows.numel(), ROW_CHUNK):
                with torch.no_grad(), self.autocast:
                    z = out.logits_at(label_rows[lo : lo + ROW_CHUNK])[:, :vocab].float()
                parts.append((z - z.mean(-1, keepdim=True)).cpu())
            rows += label_rows.numel()
            examples += len(chunk)
        return torch.cat(parts), examples

    def _load_tail_basis(self) -> None:
        """A resumed build codes its rows on the basis its tables already hold."""
        tables = mmap_safetensors(self.out / TABLES)
        self._tail = (tables["tail_mean"].to(self.args.device), tables["tail_basis"].to(self.args.device))

    # ---- shards -------------------------------------------------------------------------------------------------
    def _build_shards(self, teacher, sides, keys) -> None:
        plan = self.manifest["plan"]
        starts = np.concatenate([[0], np.cumsum(plan)]).astype(int)
        done = len(self.manifest["shards"])
        bar = tqdm(total=len(sides), initial=int(starts[done]), unit="ex", desc="teacher cache",
                   disable=not self.show_progress)
        for number in range(done, len(plan)):
            started = time.perf_counter()
            lo, hi = int(starts[number]), int(starts[number + 1])
            arrays = self._compute(teacher, sides[lo:hi], bar)
            counts = [label_count(side) for side in sides[lo:hi]]
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            crc = np.array([example_crc(arrays, offsets[i], offsets[i + 1]) for i in range(hi - lo)], dtype=np.uint32)
            arrays.update(example_keys=np.array(keys[lo:hi], dtype=np.uint64), example_offsets=offsets,
                          example_crc=crc)
            entry = _write_atomic(self.out / shard_name(number), save_numpy(arrays, metadata={"shard": str(number)}))
            entry.update(examples=hi - lo, rows=int(offsets[-1]))
            self.manifest["shards"].append(entry)
            self.manifest["build_seconds"] = round(self.manifest["build_seconds"] + time.perf_counter() - started, 3)
            write_json_atomic(self.out / MANIFEST, self.manifest)
        bar.close()

    def _compute(self, teacher, sides, bar) -> dict[str, np.ndarray]:
        """Per-row arrays of `sides` in their order (teacher batches sorted by length to save padding)."""
        s = self.manifest["settings"]
        order = sorted(range(len(sides)), key=lambda i: -len(sides[i].input_ids))
        per_example: dict[int, dict[str, np.ndarray]] = {}
        for start in range(0, len(order), self.settings.batch_size):
            chunk = order[start : start + self.settings.batch_size]
            rows = self._batch_rows(teacher, [sides[i] for i in chunk], s)
            at = 0
            for i in chunk:
                n = label_count(sides[i])
                per_example[i] = {name: values[at : at + n] for name, values in rows.items()}
                at += n
            bar.update(len(chunk))
        names = per_example[0].keys()
        return {name: np.concatenate([per_example[i][name] for i in range(len(sides))]) for name in names}

    def _batch_rows(self, teacher, sides, s) -> dict[str, np.ndarray]:
        """Per-row arrays for one teacher batch, rows in row-major label order."""
        view, out = self._forward(teacher, sides)
        rows = valid_rows(view.label_mask)  # (R,)
        result: dict[str, list[np.ndarray]] = {}
        vocab = len(self.tokenizer)
        mode = logit_mode(s)
        for lo in range(0, rows.numel() if mode != "head" else 0, ROW_CHUNK):
            part = rows[lo : lo + ROW_CHUNK]
            with torch.no_grad(), self.autocast:
                logits = out.logits_at(part)  # (r, head rows), exactly what training computes
            if mode == "full":
                array = logits.detach().cpu()
                array = array.view(torch.uint16) if array.dtype == torch.bfloat16 else array
                result.setdefault("logits", []).append(array.numpy())
                continue
            with torch.no_grad():
                z = logits[:, :vocab].float()  # (r, V)
                values, ids = z.topk(s["k"], -1)  # (r, k), largest first
                lse = torch.logsumexp(z, -1)  # (r,)
                logp = values - lse.unsqueeze(-1)
                tails = []
                for tau in s["temperatures"]:  # log of the mass outside the top k, summed over the tail itself
                    scaled = z / tau
                    full = lse if tau == 1.0 else torch.logsumexp(scaled, -1)
                    tails.append(torch.logsumexp(scaled.scatter_(1, ids, float("-inf")), -1) - full)
            result.setdefault("topk", []).append(encode_topk(logp.cpu().numpy(), ids.cpu().numpy(), s["value_bits"],
                                                             s["id_bits"]))
            result.setdefault("tail", []).append(torch.stack(tails, -1).cpu().numpy().astype(np.float32))
            if s.get("tail_rank"):
                mean, basis = self._tail
                with torch.no_grad():  # projection of the row-centred logits on the orthonormal basis
                    coef = (z - z.mean(-1, keepdim=True) - mean) @ basis.T  # (r, R)
                encoded = encode_hidden(coef, "int8")
                result.setdefault("tail_coef", []).append(encoded["values"])
                result.setdefault("tail_coef_scale", []).append(encoded["scale"])
        for layer in s["layers"]:
            hidden = out.hidden_states[layer]
            flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (R, d)
            encoded = encode_hidden(flat, s["hidden_dtype"])
            result.setdefault(f"hidden.{layer}", []).append(encoded["values"])
            if "scale" in encoded:
                result.setdefault(f"hidden_scale.{layer}", []).append(encoded["scale"])
        return {name: np.concatenate(parts) for name, parts in result.items()}

    def _sizes(self) -> dict[str, Any]:
        """Bytes per teacher token of the logit part and of the hidden-state part, from the settings."""
        s, info = self.manifest["settings"], self.manifest["teacher"]
        rows = sum(shard["rows"] for shard in self.manifest["shards"])
        logit_part = self._row_bytes({**s, "layers": []}, info)
        hidden_part = self._row_bytes(s, info) - logit_part
        return {"rows": rows, "logit_bytes_per_token": logit_part, "hidden_bytes_per_token": hidden_part,
                "hidden_bytes_per_token_per_layer": hidden_part / max(1, len(s["layers"])),
                "shard_bytes": sum(shard["bytes"] for shard in self.manifest["shards"]),
                "table_bytes": (self.manifest.get("tables") or {}).get("bytes", 0),
                "examples_per_second": round(
                    self.manifest["examples"]["unique"] / max(1e-9, self.manifest["build_seconds"]), 3)}


def build_teacher_cache(config, out_dir: str | Path, settings: CacheSettings | None = None, *,
                        show_progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Build (or finish, or confirm) the teacher cache of run config `config` in `out_dir`; returns its manifest."""
    return CacheBuilder(config, out_dir, settings, show_progress=show_progress, overwrite=overwrite).run()


def verify_cache(directory: str | Path) -> list[str]:
    """Problems found by re-hashing every file of a cache against its manifest (empty list: all good)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = [] if manifest.get("state") == "complete" else ["the build is not finished"]
    entries = ([manifest["tables"]] if manifest.get("tables") else []) + list(manifest.get("shards", []))
    for entry in entries:
        path = directory / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        if path.stat().st_size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            problems.append(f"{path}: content differs from the manifest (corrupt or truncated)")
    return problems


__all__ = ["CacheBuilder", "CacheSettings", "build_teacher_cache", "verify_cache"]
