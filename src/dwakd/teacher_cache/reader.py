"""Reading a teacher cache: open and verify it, look examples up by content, turn their rows into batch tensors.

Rows are found by the *content* of an example's teacher tokens (a 64-bit BLAKE2b key of its input ids and labels),
not by its position in a dataset, so shuffling, samplers, several ranks, gradient accumulation, resuming and
subsets (`max_train_examples`) all find the right rows without any bookkeeping; an example the cache lacks is an
error naming it. Shards are opened lazily per process (safetensors memory-maps them and reads only the slices
asked for) and every example's rows are checked against the CRC-32 written with them, so a corrupt shard is an
error naming the shard and never a wrong number.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from dwakd.data.tokenization import IGNORE_INDEX, EncodedSide
from dwakd.teacher_cache.format import (
    TeacherCacheError,
    decode_hidden,
    decode_topk,
    logit_mode,
    read_manifest,
)

INDEX_ARRAYS = ("example_keys", "example_offsets", "example_crc")


def example_key(side: EncodedSide) -> int:
    """64-bit content key of one example's teacher side: BLAKE2b of its input ids and (shifted) labels."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(side.input_ids, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.asarray(side.labels, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little")


def label_count(side: EncodedSide) -> int:
    return sum(1 for label in side.labels if label != IGNORE_INDEX)


def row_arrays(names: Sequence[str]) -> list[str]:
    """The per-row arrays of a shard (everything but the per-example index), in CRC order."""
    return sorted(n for n in names if n not in INDEX_ARRAYS)


def example_crc(arrays: dict[str, np.ndarray], start: int, end: int) -> int:
    """CRC-32 over the bytes of rows [start, end) of every per-row array, in `row_arrays` order."""
    crc = 0
    for name in row_arrays(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[name][start:end]).tobytes(), crc)
    return crc


class TeacherCache:
    """A finished teacher cache directory, opened for reading (see the module docstring)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest.get("state") != "complete":
            done = len(self.manifest.get("shards", []))
            planned = len(self.manifest.get("plan", [])) or "?"
            raise TeacherCacheError(f"teacher cache {self.directory} is incomplete ({done} of {planned} shards); "
                                    "rerun the same `dwakd teacher-cache` command to finish it")
        self.settings = self.manifest["settings"]
        self.fingerprint = self.manifest["fingerprint"]
        tables = self.directory / self.manifest["tables"]["file"]
        if not tables.is_file() or tables.stat().st_size != self.manifest["tables"]["bytes"]:
            raise TeacherCacheError(f"teacher cache file {tables} is missing or truncated; rerun `dwakd teacher-cache` "
                                    "with the same arguments to rebuild it")
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        keys, shard_of, local = [], [], []
        self._offsets: list[np.ndarray] = []
        self._crcs: list[np.ndarray] = []
        for number, shard in enumerate(self.manifest["shards"]):
            index = self._read_index(number, shard)
            keys.append(index["example_keys"])
            shard_of.append(np.full(len(index["example_keys"]), number, dtype=np.int32))
            local.append(np.arange(len(index["example_keys"]), dtype=np.int64))
            self._offsets.append(index["example_offsets"])
            self._crcs.append(index["example_crc"])
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        order = np.argsort(all_keys, kind="stable")
        self._keys = all_keys[order]
        self._shard_of = np.concatenate(shard_of)[order] if keys else np.zeros(0, dtype=np.int32)
        self._local = np.concatenate(local)[order] if keys else np.zeros(0, dtype=np.int64)

    # ---- opening ---------------------------------------------------------------------------------------------------
    def shard_path(self, number: int) -> Path:
        return self.directory / self.manifest["shards"][number]["file"]

    def _open(self, number: int):
        if os.getpid() != self._pid:  # a forked data-loader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(number)
        if handle is None:
            path = self.shard_path(number)
            try:
                handle = safe_open(str(path), framework="np")
            except Exception as exc:  # safetensors raises its own types for cut or garbled files
                raise TeacherCacheError(f"teacher cache shard {path} is corrupt or truncated ({exc}); rebuild it: "
                                        f"delete it and rerun `dwakd teacher-cache` with the same arguments") from exc
            self._handles[number] = handle
        return handle

    def _read_index(self, number: int, shard: dict[str, Any]) -> dict[str, np.ndarray]:
        path = self.directory / shard["file"]
        if not path.is_file():
            raise TeacherCacheError(f"teacher cache shard {path} is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise TeacherCacheError(f"teacher cache shard {path} is truncated or corrupt: {size} bytes, the manifest "
                                    f"says {shard['bytes']}; delete it and rerun `dwakd teacher-cache` to rebuild it")
        handle = self._open(number)
        try:
            index = {name: handle.get_tensor(name) for name in INDEX_ARRAYS}
            rows = {name: handle.get_slice(name).get_shape()[0] for name in row_arrays(handle.keys())}
        except Exception as exc:
            raise TeacherCacheError(f"teacher cache shard {path} is corrupt ({exc})") from exc
        n, offsets = len(index["example_keys"]), index["example_offsets"]
        if (n != shard["examples"] or len(offsets) != n + 1 or offsets[-1] != shard["rows"]
                or any(count != shard["rows"] for count in rows.values())):
            raise TeacherCacheError(f"teacher cache shard {path} does not match its manifest entry (examples/rows); "
                                    "delete it and rerun `dwakd teacher-cache` to rebuild it")
        return index

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers started by spawn reopen the shards
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @classmethod
    def for_run(cls, config, teacher_tokenizer, args) -> TeacherCache:
        """Open `config.teacher.cache` and refuse it, naming every difference, unless it was built for this run's
        teacher weights, adapter, tokenizer, compute setup, data files and lengths."""
        from dwakd.teacher_cache.fingerprint import compute_setup, differences, run_fingerprint

        cache = cls(config.teacher.cache)
        problems = differences(cache.fingerprint, run_fingerprint(config, teacher_tokenizer, compute_setup(args)))
        if problems:
            raise TeacherCacheError(f"teacher.cache {cache.directory} was not built for this run: "
                                    + "; ".join(problems) + ". Rebuild it with `dwakd teacher-cache`")
        return cache

    # ---- facts -------------------------------------------------------------------------------------------------------
    @property
    def lossless(self) -> bool:
        return bool(self.settings["lossless"])

    def teacher_config(self):
        """The teacher's transformers config, as stored when the cache was built."""
        from transformers import AutoConfig

        config = dict(self.manifest["teacher"]["config"])
        return AutoConfig.for_model(config.pop("model_type"), **config)

    def teacher_module(self):
        """A `CachedTeacher`: the teacher's tables and config, standing in for the model."""
        from dwakd.teacher_cache.view import CachedTeacher

        return CachedTeacher(self)

    def __len__(self) -> int:
        return len(self._keys)

    # ---- lookup ------------------------------------------------------------------------------------------------------
    def find(self, keys: np.ndarray) -> np.ndarray:
        """Positions in the sorted index of `keys` (uint64), −1 where the cache has no such example."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(self._keys):
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.searchsorted(self._keys, keys).clip(0, len(self._keys) - 1)
        return np.where(self._keys[at] == keys, at, -1)

    def check_examples(self, sides: Sequence[EncodedSide], what: str) -> None:
        """Raise naming the first examples of `sides` the cache does not hold (checked before training starts)."""
        keys = np.fromiter((example_key(s) for s in sides), dtype=np.uint64, count=len(sides))
        missing = np.nonzero(self.find(keys) < 0)[0]
        if len(missing):
            shown = ", ".join(f"#{i}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TeacherCacheError(
                f"teacher cache {self.directory} has no rows for {len(missing)} of the {len(sides)} {what} examples "
                f"({shown}): their teacher tokenization is not in it. Build the cache with this run's data selection "
                "(data.max_train_examples, data.eval, data.eval_size) or rebuild it")

    def read(self, sides: Sequence[EncodedSide]) -> dict[str, np.ndarray]:
        """Rows of `sides` concatenated in order (raw arrays as stored); verifies counts and checksums."""
        keys = np.fromiter((example_key(s) for s in sides), dtype=np.uint64, count=len(sides))
        found = self.find(keys)
        parts: dict[str, list[np.ndarray]] = {}
        for position, (side, at) in enumerate(zip(sides, found)):
            if at < 0:
                raise TeacherCacheError(f"teacher cache {self.directory} has no rows for this example (batch item "
                                        f"{position}, {len(side.input_ids)} teacher tokens)")
            number, local = int(self._shard_of[at]), int(self._local[at])
            start, end = int(self._offsets[number][local]), int(self._offsets[number][local + 1])
            if end - start != label_count(side):
                raise TeacherCacheError(f"teacher cache shard {self.shard_path(number)}: example has {end - start} "
                                        f"rows, its teacher view {label_count(side)} label positions")
            handle = self._open(number)
            try:
                arrays = {name: handle.get_slice(name)[start:end] for name in row_arrays(handle.keys())}
            except Exception as exc:
                raise TeacherCacheError(f"teacher cache shard {self.shard_path(number)} is corrupt ({exc})") from exc
            if example_crc(arrays, 0, end - start) != int(self._crcs[number][local]):
                raise TeacherCacheError(f"teacher cache shard {self.shard_path(number)} is corrupt: example {local}'s "
                                        "rows fail their checksum; delete the shard and rerun `dwakd teacher-cache` "
                                        "with the same arguments to rebuild it")
            for name, array in arrays.items():
                parts.setdefault(name, []).append(array)
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def collate(self, sides: Sequence[EncodedSide]) -> dict[str, torch.Tensor]:
        """Batch tensors `teacher_cache_*` for the teacher sides of one batch (row-major label order)."""
        raw = self.read(sides)
        s = self.settings
        out: dict[str, torch.Tensor] = {}
        mode = logit_mode(s)
        if mode == "full":
            logits = raw["logits"]
            tensor = torch.from_numpy(np.ascontiguousarray(logits))
            out["teacher_cache_logits"] = tensor.view(torch.bfloat16) if s["logits_dtype"] == "bfloat16" else tensor
        elif mode == "topk":
            logp, ids = decode_topk(raw["topk"], s["k"], s["value_bits"], s["id_bits"])
            out["teacher_cache_logp"] = torch.from_numpy(logp)
            out["teacher_cache_ids"] = torch.from_numpy(ids)
            out["teacher_cache_tail"] = torch.from_numpy(np.ascontiguousarray(raw["tail"]))
            if s.get("tail_rank"):
                out["teacher_cache_tail_coef"] = decode_hidden(raw["tail_coef"], raw["tail_coef_scale"], "int8")
        for layer in s["layers"]:
            scale = raw.get(f"hidden_scale.{layer}")
            out[f"teacher_cache_hidden_{layer}"] = decode_hidden(raw[f"hidden.{layer}"], scale, s["hidden_dtype"])
        return out

    def collator(self, base) -> TeacherCacheCollator:
        return TeacherCacheCollator(base, self)


@dataclass
class TeacherCacheCollator:
    """Wraps a `DistillationCollator`: the same batch plus the cached teacher rows of its examples."""

    base: Any
    cache: TeacherCache

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        if examples and examples[0].teacher is not None:
            batch.update(self.cache.collate([e.teacher for e in examples]))
        return batch
