"""CDM's compiled pieces: pooling two sequences along a DTW path, and the context-dependent top-k vocabulary map.

Both run on CPU with numba, outside autograd; the method (`dwakd.methods.cdm`) turns their index lists into sparse
pooling matrices and column gathers on the models' device.

`pooling_plan(path, n, m)`: from a DTW path over teacher tokens (rows, m) and student tokens (columns, n), CDM's
pooling (Chen et al. 2025, reference `transform_step_logits_fast`): the teacher side is first averaged over the
teacher tokens aligned to each student token (T_j), then both sides are averaged over the groups of student
tokens aligned to one teacher token (S_i, identical consecutive groups merged). Pooled position g of group S_g:
    student  z̄_s[g] = mean_{j∈S_g} z_s[j]
    teacher  z̄_t[g] = mean_{j∈S_g} mean_{i∈T_j} z_t[i]
returned as (pooled row, source row, weight) triples for each side.

`dynamic_vocab_map(source_topk, target_topk, exact, ...)`: per pooled position g and each source candidate token
(one of the source model's top-k there): its exact-text counterpart in the target vocabulary if there is one (a
static map), else the target top-k candidate at g with the smallest normalised edit distance
Lev(a, b) / (|a| + |b|) over their texts with spaces removed (0 for two empty texts), kept if it is below the
threshold (0.3 in the reference); ties go to the better-ranked target candidate; −1 when nothing qualifies.
Levenshtein runs over bytes, bit-parallel for tokens of up to 64 bytes (Myers/Hyyrö; a row DP with early exit
beyond), after a length lower bound that skips pairs which cannot beat the best distance so far; the search is
exact.
"""

from __future__ import annotations

import numba
import numpy as np

from dwakd.alignment.token_strings import TokenTable


def byte_arrays(table: TokenTable, strip_spaces: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All token texts of a vocabulary as one uint8 array and (vocab + 1,) int64 offsets (spaces removed by default)."""
    data = [item.replace(b" ", b"") if strip_spaces else item for item in table.data]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in data], out=offsets[1:])
    flat = np.frombuffer(b"".join(data), dtype=np.uint8).copy()
    return flat, offsets


@numba.njit(cache=True)
def _pooling_plan(path: np.ndarray, n: int, m: int):  # pragma: no cover - compiled; tested through pooling_plan
    t_lo = np.full(n, m, dtype=np.int64)  # teacher range aligned to each student token
    t_hi = np.full(n, -1, dtype=np.int64)
    s_lo = np.full(m, n, dtype=np.int64)  # student range aligned to each teacher token
    s_hi = np.full(m, -1, dtype=np.int64)
    for k in range(path.shape[0]):
        i, j = path[k, 0], path[k, 1]
        t_lo[j] = min(t_lo[j], i)
        t_hi[j] = max(t_hi[j], i)
        s_lo[i] = min(s_lo[i], j)
        s_hi[i] = max(s_hi[i], j)
    # groups: consecutive teacher tokens with the same student range form one pooled position
    group_lo = np.empty(m, dtype=np.int64)
    group_hi = np.empty(m, dtype=np.int64)
    groups = 0
    for i in range(m):
        if groups == 0 or s_lo[i] != group_lo[groups - 1] or s_hi[i] != group_hi[groups - 1]:
            group_lo[groups] = s_lo[i]
            group_hi[groups] = s_hi[i]
            groups += 1
    s_count = 0
    t_count = 0
    for g in range(groups):
        for j in range(group_lo[g], group_hi[g] + 1):
            s_count += 1
            t_count += t_hi[j] - t_lo[j] + 1
    s_group = np.empty(s_count, dtype=np.int64)
    s_row = np.empty(s_count, dtype=np.int64)
    s_weight = np.empty(s_count, dtype=np.float64)
    t_group = np.empty(t_count, dtype=np.int64)
    t_row = np.empty(t_count, dtype=np.int64)
    t_weight = np.empty(t_count, dtype=np.float64)
    a = 0
    b = 0
    for g in range(groups):
        size = group_hi[g] - group_lo[g] + 1
        for j in range(group_lo[g], group_hi[g] + 1):
            s_group[a] = g
            s_row[a] = j
            s_weight[a] = 1.0 / size
            a += 1
            span = t_hi[j] - t_lo[j] + 1
            for i in range(t_lo[j], t_hi[j] + 1):
                t_group[b] = g
                t_row[b] = i
                t_weight[b] = 1.0 / (size * span)
                b += 1
    return groups, s_group, s_row, s_weight, t_group, t_row, t_weight


def pooling_plan(path: np.ndarray, n: int, m: int):
    """(groups, student (group, row, weight), teacher (group, row, weight)) for a (steps, 2) [teacher, student] path.

    The path must start at (0, 0), end at (m − 1, n − 1) and move by unit steps (what `dtw_path` returns).
    """
    path = np.ascontiguousarray(path, dtype=np.int64)
    if n == 0 or m == 0:
        empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return 0, (empty_i, empty_i, empty_f), (empty_i, empty_i, empty_f)
    if path.ndim != 2 or path.shape[1] != 2 or path.shape[0] == 0:
        raise ValueError(f"path must be (steps, 2), got shape {path.shape}")
    if path[0].tolist() != [0, 0] or path[-1].tolist() != [m - 1, n - 1]:
        raise ValueError(f"path must run from (0, 0) to ({m - 1}, {n - 1})")
    groups, s_group, s_row, s_weight, t_group, t_row, t_weight = _pooling_plan(path, n, m)
    return int(groups), (s_group, s_row, s_weight), (t_group, t_row, t_weight)


@numba.njit(cache=True)
def _levenshtein_dp(a_bytes, a_lo, a_len, b_bytes, b_lo, b_len, bound, row):  # pragma: no cover - compiled
    """Levenshtein distance by the row DP, or any value > bound once it is certain to exceed `bound`."""
    for j in range(b_len + 1):
        row[j] = j
    for i in range(1, a_len + 1):
        prev_diag = row[0]
        row[0] = i
        best = row[0]
        ca = a_bytes[a_lo + i - 1]
        for j in range(1, b_len + 1):
            cost = 0 if ca == b_bytes[b_lo + j - 1] else 1
            value = min(row[j] + 1, row[j - 1] + 1, prev_diag + cost)
            prev_diag = row[j]
            row[j] = value
            best = min(best, value)
        if best > bound:
            return best
    return row[b_len]


@numba.njit(cache=True)
def _levenshtein_bits(peq, a_len, b_bytes, b_lo, b_len):  # pragma: no cover - compiled
    """Levenshtein distance for a pattern of ≤ 64 bytes (`peq`: its match masks per byte value), bit-parallel.

    Myers' algorithm in Hyyrö's formulation for the global distance: one pass over the text, O(1) word operations
    per text byte.
    """
    one = np.uint64(1)
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    positive = ones if a_len == 64 else (one << np.uint64(a_len)) - one  # Pv: all vertical deltas are +1
    negative = np.uint64(0)
    high = one << np.uint64(a_len - 1)
    score = a_len
    for j in range(b_len):
        eq = peq[b_bytes[b_lo + j]]
        xv = eq | negative
        xh = (((eq & positive) + positive) ^ positive) | eq
        ph = negative | (~(xh | positive) & ones)
        mh = positive & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = (ph << one) | one
        mh = mh << one
        positive = mh | (~(xv | ph) & ones)
        negative = ph & xv
    return score


@numba.njit(cache=True)
def _levenshtein_one(a_bytes, b_bytes):  # pragma: no cover - compiled; tested through levenshtein
    peq = np.zeros(256, dtype=np.uint64)
    for i in range(a_bytes.shape[0]):
        peq[a_bytes[i]] |= np.uint64(1) << np.uint64(i)
    if a_bytes.shape[0] == 0:
        return b_bytes.shape[0]
    if a_bytes.shape[0] <= 64:
        return _levenshtein_bits(peq, a_bytes.shape[0], b_bytes, 0, b_bytes.shape[0])
    row = np.empty(b_bytes.shape[0] + 1, dtype=np.int64)
    return _levenshtein_dp(a_bytes, 0, a_bytes.shape[0], b_bytes, 0, b_bytes.shape[0], 1 << 60, row)


def levenshtein(a: bytes, b: bytes) -> int:
    """Levenshtein distance between two byte strings (the kernels of `dynamic_vocab_map`)."""
    return int(_levenshtein_one(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)))


@numba.njit(cache=True)
def _dynamic_map(source_topk, target_topk, exact, src_bytes, src_off, dst_bytes, dst_off,
                 threshold):  # pragma: no cover - compiled; tested through dynamic_vocab_map
    rows, k_src = source_topk.shape
    k_dst = target_topk.shape[1]
    out = np.full((rows, k_src), -1, dtype=np.int64)
    longest = 1
    for s in range(dst_off.shape[0] - 1):
        longest = max(longest, dst_off[s + 1] - dst_off[s])
    row = np.empty(longest + 1, dtype=np.int64)
    peq = np.zeros(256, dtype=np.uint64)
    for g in range(rows):
        for a in range(k_src):
            t = source_topk[g, a]
            if 0 <= t < exact.shape[0] and exact[t] >= 0:
                out[g, a] = exact[t]
                continue
            if t < 0 or t >= src_off.shape[0] - 1:
                continue
            a_lo, a_len = src_off[t], src_off[t + 1] - src_off[t]
            bits = 0 < a_len <= 64
            if bits:
                for i in range(a_len):
                    peq[src_bytes[a_lo + i]] |= np.uint64(1) << np.uint64(i)
            best = -1
            best_d = threshold
            for c in range(k_dst):
                s = target_topk[g, c]
                if s < 0 or s >= dst_off.shape[0] - 1:
                    continue
                b_lo, b_len = dst_off[s], dst_off[s + 1] - dst_off[s]
                total = a_len + b_len
                if total == 0:
                    d = 0.0
                else:
                    if abs(a_len - b_len) >= best_d * total:  # |length difference| ≤ Lev: cannot beat best_d
                        continue
                    if a_len == 0:
                        lev = b_len
                    elif bits:
                        lev = _levenshtein_bits(peq, a_len, dst_bytes, b_lo, b_len)
                    else:
                        lev = _levenshtein_dp(src_bytes, a_lo, a_len, dst_bytes, b_lo, b_len, best_d * total, row)
                    d = lev / total
                if d < best_d:
                    best_d = d
                    best = s
            out[g, a] = best
            if bits:
                for i in range(a_len):
                    peq[src_bytes[a_lo + i]] = np.uint64(0)
    return out


def dynamic_vocab_map(source_topk: np.ndarray, target_topk: np.ndarray, exact: np.ndarray,
                      source_bytes: tuple[np.ndarray, np.ndarray], target_bytes: tuple[np.ndarray, np.ndarray],
                      threshold: float) -> np.ndarray:
    """(rows, k) target id for every source top-k candidate at every pooled position, −1 if unmapped (module doc).

    `source_topk` (rows, k) and `target_topk` (rows, k') are token ids (best first); `exact` (V_source,) is the
    static exact-text map (−1: none); `*_bytes` are `byte_arrays(...)` of the two vocabularies.
    """
    source_topk = np.ascontiguousarray(source_topk, dtype=np.int64)
    target_topk = np.ascontiguousarray(target_topk, dtype=np.int64)
    if source_topk.ndim != 2 or target_topk.ndim != 2 or source_topk.shape[0] != target_topk.shape[0]:
        raise ValueError(f"top-k arrays must be (rows, k) with equal rows, got {source_topk.shape} and "
                         f"{target_topk.shape}")
    return _dynamic_map(source_topk, target_topk, np.ascontiguousarray(exact, dtype=np.int64),
                        source_bytes[0], source_bytes[1], target_bytes[0], target_bytes[1], float(threshold))
