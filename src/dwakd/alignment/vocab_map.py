"""Teacher→student vocabulary map by minimum edit distance between token strings (MinED, FuseLLM), cached on disk.

Definition (FuseLLM's `find_best_mapping`, on decoded bytes instead of marker-swapped token strings):
    map(t) = the student token with exactly the same text, if one exists (lowest id);
             else argmin_s ED(lower(t), lower(s)), ties broken by the lowest student id,
with ED the Levenshtein distance over bytes, `lower` ASCII-only lower-casing, and the teacher's EOS forced onto
the student's EOS. Student ids that decode to nothing (holes in the id range) are never chosen.

Speed (150k × 50k strings, ~7.5e9 pairs by brute force): the search runs in stages, each exact —
1. exact text, then exact lower-cased text (dictionary look-ups);
2. distance 1 through a deletion index (SymSpell): two strings at distance ≤ 1 share a string obtained by
   deleting at most one byte from each, so every distance-1 candidate is found, then verified;
3. the rest (distance ≥ 2) by a brute-force scan with rapidfuzz's bit-parallel Levenshtein (`process.cdist`),
   chunked so one chunk's (queries × student) matrix stays around 64 MiB.
The result is identical to a brute-force argmin (tested against one on small vocabularies).
Qwen (151,646) × GPT-2 (50,257), busy 2-core CPU (benchmarks/vocab_map.py): 33–44 s — 42,257 exact,
5,882 exact up to case, 42,355 at distance 1, 61,152 by brute force (most of the time); a cached load ≈0.02 s.

Cache: `load_or_build_vocab_map` stores the map as .npz under `<cache_dir>/vocab_maps/`, keyed by the sha256
of both tokenizers' decoded tables (`TokenTable.fingerprint`) and this module's algorithm version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dwakd.alignment.token_strings import TokenTable, token_table

logger = logging.getLogger(__name__)

ALGORITHM_VERSION = "mined-vocab-map-v1"
CHUNK_ELEMENTS = 1 << 24  # int32 cells per brute-force chunk (64 MiB)


def _rapidfuzz():
    """rapidfuzz's (process, Levenshtein), with an actionable error when it is missing."""
    try:
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the MinED vocabulary map and alignment need rapidfuzz: pip install rapidfuzz") from exc
    return process, Levenshtein


@dataclass
class VocabMap:
    """Teacher id -> student id (and its edit distance); `student_to_teacher` picks one teacher per student id."""

    teacher_to_student: np.ndarray  # (V_t,) int64, −1 only if the student side has no token at all
    distance: np.ndarray  # (V_t,) int32 edit distance (lower-cased) to the chosen student token; 0 for exact text
    student_size: int
    stats: dict[str, float] = field(default_factory=dict)  # counts per stage and build seconds

    @property
    def teacher_size(self) -> int:
        return int(self.teacher_to_student.shape[0])

    def student_to_teacher(self) -> np.ndarray:
        """(V_s,) int64: per student id, the teacher id mapped onto it at the least distance (then lowest id), or −1."""
        order = np.lexsort((np.arange(self.teacher_size), self.distance))  # by distance, then teacher id
        out = np.full(self.student_size, -1, dtype=np.int64)
        targets = self.teacher_to_student[order]
        keep = targets >= 0
        order, targets = order[keep], targets[keep]
        first = np.unique(targets, return_index=True)[1]  # first occurrence = best teacher for that student id
        out[targets[first]] = order[first]
        return out


def _ascii_lower(strings: list[str]) -> list[str]:
    """Lower-case ASCII letters only (latin-1 strings of raw bytes: non-ASCII bytes must stay untouched)."""
    table = str.maketrans({chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)})
    return [s.translate(table) for s in strings]


def _deletion_variants(s: str) -> set[str]:
    """s itself and every string obtained by deleting one character."""
    return {s} | {s[:k] + s[k + 1 :] for k in range(len(s))}


def build_vocab_map(teacher: TokenTable, student: TokenTable, workers: int = -1) -> VocabMap:
    """Exact minimum-edit-distance map of every teacher id onto a student id (see the module docstring)."""
    process, levenshtein = _rapidfuzz()
    start = time.perf_counter()
    t_text, s_text = teacher.latin1(), student.latin1()
    n_t, n_s = len(t_text), len(s_text)
    mapping = np.full(n_t, -1, dtype=np.int64)
    distance = np.full(n_t, -1, dtype=np.int32)
    candidates = [i for i in range(n_s) if student.data[i]]  # student ids that stand for some text
    if not candidates:
        return VocabMap(mapping, distance, n_s, {"seconds": 0.0})

    exact: dict[str, int] = {}
    for i in candidates:
        exact.setdefault(s_text[i], i)
    t_lower, s_lower = _ascii_lower(t_text), _ascii_lower(s_text)
    lower: dict[str, int] = {}
    for i in candidates:
        lower.setdefault(s_lower[i], i)
    stats = {"exact": 0, "lower_exact": 0, "distance_1": 0, "brute_force": 0}
    todo: list[int] = []
    for t in range(n_t):
        hit = exact.get(t_text[t])
        if hit is not None:
            mapping[t], distance[t] = hit, 0
            stats["exact"] += 1
            continue
        hit = lower.get(t_lower[t])
        if hit is not None:
            mapping[t], distance[t] = hit, 0
            stats["lower_exact"] += 1
            continue
        todo.append(t)
    if teacher.eos_id is not None and student.eos_id is not None and 0 <= teacher.eos_id < n_t:
        mapping[teacher.eos_id], distance[teacher.eos_id] = student.eos_id, 0
        todo = [t for t in todo if t != teacher.eos_id]

    # stage 2: distance exactly 1 via a deletion index over lower-cased student strings
    index: dict[str, list[int]] = {}
    for i in candidates:
        for variant in _deletion_variants(s_lower[i]):
            index.setdefault(variant, []).append(i)  # ids appended in increasing order
    rest: list[int] = []
    for t in todo:
        query = t_lower[t]
        best = -1
        for variant in _deletion_variants(query):
            for i in index.get(variant, ()):  # increasing ids: stop at the first verified or non-improving one
                if best >= 0 and i >= best:
                    break
                if levenshtein.distance(query, s_lower[i], score_cutoff=1) == 1:
                    best = i
                    break
        if best >= 0:
            mapping[t], distance[t] = best, 1
            stats["distance_1"] += 1
        else:
            rest.append(t)

    # stage 3: brute force over all student strings for what is left (distance >= 2)
    if rest:
        choices = [s_lower[i] for i in candidates]
        cand = np.asarray(candidates, dtype=np.int64)
        chunk = max(1, CHUNK_ELEMENTS // len(choices))
        for lo in range(0, len(rest), chunk):
            ids = rest[lo : lo + chunk]
            matrix = process.cdist([t_lower[t] for t in ids], choices, scorer=levenshtein.distance,
                                   dtype=np.int32, workers=workers)  # (chunk, candidates)
            best = matrix.argmin(axis=1)  # first minimum = lowest student id
            mapping[ids] = cand[best]
            distance[ids] = matrix[np.arange(len(ids)), best]
        stats["brute_force"] = len(rest)
    stats["seconds"] = time.perf_counter() - start
    return VocabMap(mapping, distance, n_s, {k: float(v) for k, v in stats.items()})


def vocab_map_key(teacher: TokenTable, student: TokenTable) -> str:
    """Cache key: both tables' content fingerprints and the algorithm version."""
    digest = hashlib.sha256(f"{ALGORITHM_VERSION}|{teacher.fingerprint()}|{student.fingerprint()}".encode())
    return digest.hexdigest()[:32]


def default_cache_dir() -> Path:
    """$DWAKD_CACHE or ~/.cache/dwakd (shared with the converted tokenizers)."""
    return Path(os.environ.get("DWAKD_CACHE", Path.home() / ".cache" / "dwakd"))


def load_or_build_vocab_map(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    cache_dir: str | os.PathLike | None = None,
    *,
    teacher_size: int | None = None,
    student_size: int | None = None,
    workers: int = -1,
) -> VocabMap:
    """The teacher→student map for two tokenizers, read from `<cache_dir>/vocab_maps/` or built and stored there."""
    teacher = token_table(teacher_tokenizer, teacher_size)
    student = token_table(student_tokenizer, student_size)
    return cached_vocab_map(teacher, student, cache_dir, workers=workers)


def cached_vocab_map(
    teacher: TokenTable, student: TokenTable, cache_dir: str | os.PathLike | None = None, *, workers: int = -1
) -> VocabMap:
    """`build_vocab_map` behind a disk cache keyed by both tables' fingerprints (`<cache_dir>/vocab_maps/<key>.npz`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "vocab_maps" / f"{vocab_map_key(teacher, student)}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                vmap = VocabMap(data["teacher_to_student"].astype(np.int64), data["distance"].astype(np.int32),
                                int(data["student_size"]), {"cached": 1.0})
            if vmap.teacher_size == len(teacher) and vmap.student_size == len(student):
                return vmap
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("ignoring unreadable vocabulary map cache %s (%s); rebuilding", path, exc)
    logger.info("building the teacher->student vocabulary map (%d x %d tokens)", len(teacher), len(student))
    vmap = build_vocab_map(teacher, student, workers=workers)
    logger.info("vocabulary map built in %.1f s: %s", vmap.stats.get("seconds", 0.0), vmap.stats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, teacher_to_student=vmap.teacher_to_student, distance=vmap.distance,
             student_size=np.int64(vmap.student_size))
    tmp.replace(path)  # atomic: concurrent builders never read a half-written file
    return vmap


def exact_text_map(teacher: TokenTable, student: TokenTable) -> np.ndarray:
    """(V_t,) int64: the lowest student id whose text is byte-identical to the teacher token's, −1 if none.

    The teacher's EOS maps to the student's EOS. This is DSKDv2's shared vocabulary (the reference matches
    token strings after unifying "Ġ"/"▁"; decoding both to bytes does the same for every convention).
    """
    index: dict[bytes, int] = {}
    for i, item in enumerate(student.data):
        if item:
            index.setdefault(item, i)
    out = np.array([index.get(item, -1) if item else -1 for item in teacher.data], dtype=np.int64)
    if teacher.eos_id is not None and student.eos_id is not None and 0 <= teacher.eos_id < len(out):
        out[teacher.eos_id] = student.eos_id
    return out
