"""On-disk format of a teacher cache: manifest, shards, tables, and the value/id encodings (docs/teacher-cache.md).

A cache directory holds
- `manifest.json`: fingerprint, settings, teacher facts, the list of finished shards (rewritten atomically after
  each shard, so a killed build resumes after the last shard it lists);
- `tables.safetensors`: the teacher's input-embedding table and LM head (one tensor when tied), in the teacher's
  dtype, and a top-k cache's tail basis, read memory-mapped;
- `shard-NNNNN.safetensors`: rows of many examples. Per example: its key, row offset and CRC-32; per row (one
  row per teacher label position, row-major): the logit part and one array per cached hidden-state layer.

Logit part, lossless mode (`k` ≥ vocabulary): `logits` (rows, head rows) exactly as the teacher's head produced
them. Top-k mode: `topk` (rows, bytes) — k entries per row bit-packed, each the token id (`id_bits` bits) and a
`value_bits`-bit code of −log p (p = the token's probability at τ = 1): the upper bits of the float16 pattern of
−log p (sign bit dropped, mantissa rounded to `value_bits − 5` bits); plus `tail` (rows, temperatures) float32, the
log of the probability mass outside the top k at each stored temperature; with a rank-R tail (`tail_rank` R > 0),
`tail_coef` (rows, R) int8 and `tail_coef_scale` (rows,) float32, the row's coefficients on the tail basis (coded like
int8 hidden states, below), whose `tail_mean` (V,) and `tail_basis` (R, V) float32 are in the tables. Head mode
(`k = "head"`): no logit part; the logits are recomputed at training time from the cached final hidden state with the
cached LM head (exact when the hidden state is stored in the dtype the teacher computes it in).
Hidden states: `hidden.L` (rows, d) in float32/float16/bfloat16 (bfloat16 stored as its uint16 bit pattern), or
int8 with a float32 per-row scale `hidden_scale.L` (x ≈ code · scale, scale = max|x| / 127).
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "dwakd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = "tables.safetensors"
HIDDEN_DTYPES = ("float32", "float16", "bfloat16", "int8")
MAX_NEG_LOGP = 60000.0  # below float16's largest finite value (65504): codes never round up to inf by accident


LOGIT_MODES = ("full", "topk", "head")  # every logit / top-k + tail / recomputed from the final hidden state


class TeacherCacheError(ValueError):
    """A teacher cache cannot be used: missing, incomplete, corrupt, or built for something else."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def logit_mode(settings: dict[str, Any]) -> str:
    """How a cache's manifest `settings` store the teacher's logits: "full", "topk" or "head" (see the docstring).

    Caches written before head mode existed have no "logits" key: theirs follows from "lossless".
    """
    mode = settings.get("logits") or ("full" if settings["lossless"] else "topk")
    if mode not in LOGIT_MODES:
        raise TeacherCacheError(f"teacher cache logit mode {mode!r} is not one this dwakd reads "
                                f"({', '.join(LOGIT_MODES)}); rebuild the cache or upgrade dwakd")
    return mode


# ---- manifest --------------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync it, then rename over `path` (readers never see a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a cache directory; TeacherCacheError naming the file when it is missing or unreadable."""
    path = directory / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(f"{directory} is not a teacher cache (no {MANIFEST}); build one with "
                                "`dwakd teacher-cache CONFIG --out DIR`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherCacheError(f"{path} is corrupt ({exc})") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise TeacherCacheError(f"{path} is not a dwakd teacher-cache manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{path}: format version {manifest.get('version')} is not supported by this dwakd "
                                f"(reads version {FORMAT_VERSION}); rebuild the cache")
    return manifest


# ---- value codes -------------------------------------------------------------------------------------------------
def id_bits_for(vocab: int) -> int:
    """Bits per token id for a vocabulary of `vocab` ids (18 for Qwen's 151,646)."""
    return max(1, int(vocab - 1).bit_length())


def encode_neg_logp(neg_logp: np.ndarray, value_bits: int) -> np.ndarray:
    """uint64 codes of values ≥ 0: the float16 bit pattern without its sign bit, rounded to `value_bits` bits.

    value_bits = 15 keeps float16 exactly; each bit less halves the mantissa precision (relative error ≤ 2^−(m+1)
    with m = value_bits − 5 mantissa bits). +inf (p = 0) stays +inf.
    """
    if not 6 <= value_bits <= 15:
        raise ValueError(f"value_bits must be in 6..15, got {value_bits}")
    x = neg_logp.astype(np.float32)
    x = np.where(np.isposinf(x), np.float32(np.inf), np.clip(x, 0.0, MAX_NEG_LOGP))
    bits = x.astype(np.float16).view(np.uint16).astype(np.uint64)  # the sign bit is 0
    shift = 15 - value_bits
    if shift:
        rounded = (bits + (1 << (shift - 1))) >> shift  # round to nearest (a carry moves into the exponent)
        bits = np.where(bits >= 0x7C00, bits >> shift, rounded)  # inf stays inf
    return bits


def decode_neg_logp(codes: np.ndarray, value_bits: int) -> np.ndarray:
    """float32 values of `encode_neg_logp` codes."""
    shift = 15 - value_bits
    return (codes.astype(np.uint64) << shift).astype(np.uint16).view(np.float16).astype(np.float32)


def pack_bits(entries: np.ndarray, width: int) -> np.ndarray:
    """(rows, k) uint64 entries of `width` bits -> (rows, ceil(k·width/8)) uint8, little-endian bit order."""
    rows, k = entries.shape
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((entries[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(rows, k * width)
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, k: int, width: int) -> np.ndarray:
    """Inverse of `pack_bits`: (rows, bytes) uint8 -> (rows, k) uint64."""
    rows = packed.shape[0]
    bits = np.unpackbits(packed, axis=1, count=k * width, bitorder="little").reshape(rows, k, width)
    weights = (np.uint64(1) << np.arange(width, dtype=np.uint64))
    return (bits.astype(np.uint64) * weights).sum(-1, dtype=np.uint64)


def encode_topk(logp: np.ndarray, ids: np.ndarray, value_bits: int, id_bits: int) -> np.ndarray:
    """(rows, k) log-probabilities and token ids -> (rows, bytes) uint8 packed entries."""
    codes = encode_neg_logp(-logp, value_bits)
    entries = (codes << np.uint64(id_bits)) | ids.astype(np.uint64)
    return pack_bits(entries, value_bits + id_bits)


def decode_topk(packed: np.ndarray, k: int, value_bits: int, id_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, bytes) packed entries -> ((rows, k) float32 log-probabilities, (rows, k) int64 ids)."""
    entries = unpack_bits(packed, k, value_bits + id_bits)
    ids = (entries & np.uint64((1 << id_bits) - 1)).astype(np.int64)
    logp = -decode_neg_logp(entries >> np.uint64(id_bits), value_bits)
    return logp, ids


def topk_row_bytes(k: int, value_bits: int, id_bits: int, tail_rank: int = 0) -> int:
    """Bytes per row of the packed top-k entries and, with a rank-R tail, its int8 coefficients and float32 scale."""
    return math.ceil(k * (value_bits + id_bits) / 8) + (tail_rank + 4 if tail_rank else 0)


# ---- hidden states -------------------------------------------------------------------------------------------------
def encode_hidden(hidden: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """(rows, d) hidden states -> {"values": array, "scale": (rows,) float32 for int8}."""
    x = hidden.detach().float().cpu()
    if dtype == "float32":
        return {"values": x.numpy()}
    if dtype == "float16":
        return {"values": x.half().numpy()}
    if dtype == "bfloat16":
        return {"values": x.bfloat16().view(torch.uint16).numpy()}
    if dtype == "int8":
        scale = x.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # (rows,)
        codes = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"values": codes.numpy(), "scale": scale.numpy()}
    raise ValueError(f"unknown hidden dtype {dtype!r}; choose {', '.join(HIDDEN_DTYPES)}")


def decode_hidden(values: np.ndarray, scale: np.ndarray | None, dtype: str) -> torch.Tensor:
    """Inverse of `encode_hidden` as a torch tensor (float32, float16 or bfloat16; int8 -> float32)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values)).view(torch.bfloat16)
    if dtype == "int8":
        return torch.from_numpy(values.astype(np.float32) * scale[:, None].astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(values))


# ---- memory-mapped safetensors ---------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
              "BF16": (np.uint16, torch.bfloat16), "F64": (np.float64, torch.float64)}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as read-only memory maps (no copy; pages load on first touch).

    Parses the header (8-byte little-endian length + JSON) and maps each tensor's byte range; safetensors' own
    loader copies into memory, which would defeat sharing the tables between processes through the page cache.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise TeacherCacheError(f"{path} is truncated (header longer than the file)")
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise TeacherCacheError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        np_dtype, torch_dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if base + end > size:
            raise TeacherCacheError(f"{path} is truncated (tensor {name} ends past the end of the file)")
        shape = tuple(info["shape"])
        array = np.memmap(path, dtype=np_dtype, mode="r", offset=base + start, shape=shape)
        with warnings.catch_warnings():  # read-only maps: torch warns that writes would fail (none happen)
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        out[name] = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor
    return out
