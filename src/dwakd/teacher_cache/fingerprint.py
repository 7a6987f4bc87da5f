"""What a teacher cache was built from, as comparable digests: teacher weights, adapter, tokenizer, data, lengths.

`run_fingerprint(config, teacher_tokenizer, compute)` gives one dict; `differences(cached, current)` names every
component that differs, in words a user can act on. File contents are hashed with SHA-256 once and the digest
is remembered by (absolute path, size, mtime) in `$DWAKD_CACHE/file-digests.json`, so checking a multi-GB teacher
costs its read once per file version (measured: docs/teacher-cache.md#fingerprint).

Choices:
- weights of a local directory or hub snapshot: every weight file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`) and
  `config.json`; a hub name is resolved to its local snapshot (offline), never downloaded;
- a random-init `tiny` teacher has no files: its fingerprint is its recipe (architecture, sizes, seed, vocabulary
  size) plus the torch and transformers versions, whose initialisers define the weights;
- the tokenizer: its serialized `tokenizer.json` content, class, special tokens and length;
- data: content digests of the JSONL files of `data.train` / `data.eval` (a `datasets` name: its own fingerprint),
  compared in order and not by path, so a moved or copied data file (a copied demo folder) is the same data;
  which examples are used (`max_train_examples`, `eval_size`, ...) is not part of it: the cache is looked up by the
  content of each example's teacher tokens, and training checks up front that every example it will read is cached;
- the compute setup (dtype, attention implementation, autocast) of the teacher forward: it changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dwakd.teacher_cache.format import write_json_atomic

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DIGESTS_FILE = "file-digests.json"
_CHUNK = 1 << 24


def _digest_store() -> Path:
    from dwakd.tokenizers import cache_dir

    return cache_dir() / _DIGESTS_FILE


def file_digest(path: str | Path, remember: bool = True) -> str:
    """SHA-256 of a file's content, remembered by (absolute path, size, mtime_ns) so unchanged files are not re-read."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    store = _digest_store()
    known: dict[str, Any] = {}
    if remember and store.is_file():
        try:
            known = json.loads(store.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            known = {}
        entry = known.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if remember:
        known[key] = [stat.st_size, stat.st_mtime_ns, value]
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(store, known)
        except OSError:  # a read-only cache dir only costs re-hashing next time
            pass
    return value


def _combine(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _resolve_model_dir(name_or_path: str) -> Path:
    """A local directory, or the local snapshot of a hub model (offline; never downloads)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as exc:  # not cached locally, or not a hub id
        raise ValueError(f"cannot fingerprint {name_or_path!r}: it is neither a local directory nor a model in the "
                         f"local Hugging Face cache ({exc})") from exc


def directory_digest(directory: Path, suffixes: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """Digest over the files of `directory` with one of `suffixes` (plus the named `extra` files)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix in suffixes or p.name in extra))
    if not files:
        raise ValueError(f"cannot fingerprint {directory}: no weight files ({', '.join(suffixes)}) in it")
    return _combine({p.name: file_digest(p) for p in files})


def weights_fingerprint(spec, vocab_size: int) -> str:
    """Digest of the teacher's weights: its files, or the recipe of a random-init `tiny` model."""
    if spec.tiny is not None:
        import torch
        import transformers

        recipe = {"tiny": spec.tiny, "seed": spec.seed, "vocab": vocab_size, "torch": torch.__version__.split("+")[0],
                  "transformers": transformers.__version__}
        return "tiny:" + _combine({"recipe": json.dumps(recipe, sort_keys=True, default=str)})
    if spec.name_or_path is None:
        raise ValueError("teacher: set teacher.name_or_path or teacher.tiny")
    model_dir = _resolve_model_dir(spec.name_or_path)
    return directory_digest(model_dir, WEIGHT_SUFFIXES, ("config.json",))


def adapter_fingerprint(spec) -> str | None:
    if not spec.adapter:
        return None
    return directory_digest(_resolve_model_dir(spec.adapter), WEIGHT_SUFFIXES, ("adapter_config.json",))


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of the tokenizer's serialized JSON, class, special tokens and length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = {"json": hashlib.sha256(serialized.encode()).hexdigest(), "class": type(tokenizer).__name__,
             "special": json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             "eos": str(tokenizer.eos_token_id), "pad": str(tokenizer.pad_token_id), "len": str(len(tokenizer))}
    return _combine(parts)


def _source_files(sources, split: str) -> dict[str, str]:
    """{source as written: content digest} for one split's data sources (files, dirs holding `<split>.jsonl`, names)."""
    if sources is None:
        return {}
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = {}
    for source in sources:
        path = Path(source)
        if path.is_dir() and (path / f"{split}.jsonl").is_file():
            path = path / f"{split}.jsonl"
        if path.is_file():
            out[str(source)] = file_digest(path)
        else:  # a `datasets` name or path: the library's own content fingerprint
            import datasets

            out[str(source)] = "datasets:" + datasets.load_dataset(str(source), split=split)._fingerprint
    return out


def data_fingerprint(data) -> dict[str, dict[str, str]]:
    return {"train": _source_files(data.train, "train"), "eval": _source_files(data.eval, "validation")}


def compute_setup(args) -> dict[str, Any]:
    """The autocast the Trainer applies around the model forward (accelerate's mixed precision), from
    TrainingArguments: it is part of what the teacher computes."""
    return {"autocast": "bfloat16" if getattr(args, "bf16", False) else "float16" if getattr(args, "fp16", False)
            else None}


def run_fingerprint(config, teacher_tokenizer, compute: dict[str, Any]) -> dict[str, Any]:
    """Everything the cached numbers depend on, for a run config (teacher spec, data, lengths) and compute setup."""
    spec = config.teacher
    return {
        "teacher_weights": weights_fingerprint(spec, len(teacher_tokenizer)),
        "teacher_adapter": adapter_fingerprint(spec),
        "teacher_compute": {"dtype": spec.dtype, "attn_implementation": spec.attn_implementation, **compute},
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
        "data": data_fingerprint(config.data),
        "tokenization": {"max_prompt_length": config.data.max_prompt_length, "max_length": config.data.max_length},
    }


_NAMES = {
    "teacher_weights": "teacher weights (teacher.name_or_path / teacher.tiny)",
    "teacher_adapter": "teacher adapter (teacher.adapter)",
    "teacher_compute": "teacher compute setup (teacher.dtype / attn_implementation / training.bf16|fp16 autocast)",
    "teacher_tokenizer": "teacher tokenizer (teacher.tokenizer)",
}


def differences(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a cache's fingerprint and the run's, one readable line per component."""
    out = []
    for key, label in _NAMES.items():
        if cached.get(key) != current.get(key):
            out.append(f"{label}: cache {_short(cached.get(key))}, this run {_short(current.get(key))}")
    for split in ("train", "eval"):
        old, new = cached.get("data", {}).get(split, {}), current.get("data", {}).get(split, {})
        if list(old.values()) == list(new.values()):  # the same contents in the same order: files may have moved
            continue
        if set(old) != set(new):
            out.append(f"data.{split}: cache built from {sorted(old) or 'nothing'}, "
                       f"this run reads {sorted(new) or 'nothing'}")
            continue
        changed = [name for name in new if old[name] != new[name]]
        out.append(f"data.{split}: content of {', '.join(changed)} differs from when the cache was built")
    old, new = cached.get("tokenization", {}), current.get("tokenization", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"data.{key}: cache {old.get(key)}, this run {new.get(key)}")
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 24:
        prefix, _, digest = value.rpartition(":")
        return f"{prefix + ':' if prefix else ''}{digest[:12]}…"
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value

