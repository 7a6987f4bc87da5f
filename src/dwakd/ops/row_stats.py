"""Per-row entropy and peak probability of softmax(z) over a vocabulary, without a (rows, V) temporary.

DWA-KD weighs tokens by H(softmax(z)) of the student and the teacher and gates by max softmax of the projected
teacher, at every response row and over vocabularies of 50k-150k entries. The plain PyTorch path
(`row_entropy_peak_reference`: log_softmax, exp, a row dot product, chunked over rows) makes five passes over each
chunk and two exponentials per entry; on CPU that cost dwakd about 15 % of a dskd step on the tiny recipe.

The fast CPU path is two numba passes per row, the maximum m and then:
with t_v = (z_v − m)·log2(e) ≤ 0 and e_v = 2^t_v (a vectorised polynomial, `ops/_numba_math.py`),
    Z = Σ_v e_v,   H = ln Z − ln 2 · (Σ_v e_v·t_v) / Z,   peak = 1 / Z   (the maximum contributes e = 1).
Sums are float32 with reassociation allowed (vector partial sums); entries below 2^−125 relative to the maximum
count as 2^−125 (at most V·2^−125 ≈ 4e−33 of Z). A row with a NaN, a +inf, or only −inf entries gives NaN, as the
reference does. Rows are split over up to `torch.get_num_threads()` threads (the kernel releases the GIL; they run in
torch's own OpenMP team where torch uses libgomp, see `ops._threads`). Measured on 110 × 151,646 float32 rows
(randn·3), AVX2, quiet machine: 31 ms with one thread, 16 ms with two, against the reference's 172 ms; largest
entropy error 1.3e−4 nats against the reference's 1.2e−3 (both vs float64). On 240 × 151,646 rows (randn·3), one
thread of an AVX-512 Xeon: 39 ms; 47 ms while the NaN count was an int64, which held the vectorised loop to 4
float32 lanes (xmm) instead of 8 (ymm).

`row_entropy_peak` picks the fast path for float32 CPU tensors, the Triton kernel of `ops._row_stats_triton` (one
read of each row, one launch) for 16/32-bit CUDA tensors when Triton is installed (CUDA builds of torch ship it),
and the reference otherwise (float64, other devices, or a Triton that fails to compile: one warning).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from dwakd.ops._threads import run_over_rows
from dwakd.ops.row_math import chunk_rows, compute_dtype, iter_row_chunks, log_probs, no_autocast, row_dot


def _kernel():
    """The numba kernel, compiled on first use (or loaded from numba's on-disk cache)."""
    global _ROW_STATS
    if _ROW_STATS is None:
        from numba import njit

        from dwakd.ops._numba_math import _T_MIN as t_min
        from dwakd.ops._numba_math import _exp2_nonpos_f32
        from dwakd.ops._numba_math import _row_max_f32 as row_max

        log2e, ln2 = np.float32(math.log2(math.e)), np.float32(math.log(2.0))
        zero, one = np.float32(0.0), np.float32(1.0)
        neg_inf = np.float32(-np.inf)  # float32: a float64 m would turn the whole pass into float64

        @njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})
        def row_stats(x, rows, vocab, start, end, entropy, peak):  # pragma: no cover - compiled
            for k in range(start, end):
                row = x[rows[k]]
                m = row_max(row, vocab)  # a NaN is caught by the count below
                if not (m > neg_inf and m < -neg_inf):  # +inf, or every entry −inf
                    entropy[k] = np.nan
                    peak[k] = np.nan
                    continue
                total = zero
                weighted = zero
                nans = zero  # a float32 count: an int64 one would halve the vector width of the whole loop
                for v in range(vocab):
                    z = row[v]
                    nans += one if z != z else zero
                    t = (z - m) * log2e
                    t = t if t > t_min else t_min
                    e = _exp2_nonpos_f32(t)
                    total += e
                    weighted += e * t
                if nans:
                    entropy[k] = np.nan
                    peak[k] = np.nan
                else:
                    entropy[k] = math.log(total) - ln2 * weighted / total
                    peak[k] = 1.0 / total

        _ROW_STATS = row_stats
    return _ROW_STATS


_ROW_STATS = None


def row_entropy_peak_reference(
    flat: torch.Tensor, rows: torch.Tensor | None, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H(softmax(z)) in nats, max softmax(z)) per selected row of a (N, ≥ vocab) tensor over its first `vocab`
    columns, in at least float32, chunked over rows (plain PyTorch)."""
    total = flat.shape[0] if rows is None else rows.numel()
    dtype = compute_dtype(flat)
    entropy = torch.empty(total, dtype=dtype, device=flat.device)
    peak = torch.empty(total, dtype=dtype, device=flat.device)
    with no_autocast(flat):  # the row dot product must not drop to bf16
        for start, end, z in iter_row_chunks(flat[:, :vocab], rows, chunk_rows(vocab)):
            log_p = log_probs(z, 1.0)  # −inf clamped: 0·log 0 stays 0
            entropy[start:end] = -row_dot(log_p.exp(), log_p)
            peak[start:end] = log_p.amax(-1).exp()
            del z, log_p  # before the next chunk is formed
    return entropy, peak


def _fast_path_applies(flat: torch.Tensor) -> bool:
    return flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.stride(-1) == 1


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_STATE: dict[str, bool] = {}  # "usable": whether the Triton kernel imported and ran (decided once)


def _triton_applies(flat: torch.Tensor) -> bool:
    """CUDA tensors of a 16/32-bit float dtype, last axis contiguous, when Triton is usable."""
    if flat.device.type != "cuda" or flat.dtype not in _TRITON_DTYPES or flat.stride(-1) != 1:
        return False
    return _TRITON_STATE.get("usable", True)


def _row_entropy_peak_triton(flat: torch.Tensor, rows: torch.Tensor | None, vocab: int):
    """The Triton kernel's result. Its first call decides whether Triton serves here: if it cannot be imported or
    fails to compile, one warning, None, and the reference from then on. Once it has run, errors propagate."""
    first = "usable" not in _TRITON_STATE
    try:
        from dwakd.ops._row_stats_triton import row_entropy_peak_triton

        result = row_entropy_peak_triton(flat, rows, vocab)
    except Exception as exc:  # noqa: BLE001 - any import or compile failure at the first call: the reference serves
        if not first:
            raise
        warnings.warn(f"row statistics: the Triton kernel is unavailable here ({type(exc).__name__}: {exc}); "
                      "using the PyTorch reference", RuntimeWarning, stacklevel=3)
        _TRITON_STATE["usable"] = False
        return None
    _TRITON_STATE["usable"] = True
    return result


@torch.no_grad()
def row_entropy_peak(
    flat: torch.Tensor, rows: torch.Tensor | None = None, vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy in nats, peak probability) of softmax over the first `vocab` columns of the selected rows
    (all rows when `rows` is None) of a 2-D tensor; (K,) each, no gradient. `rows` are bounds-checked on CPU; on
    CUDA they are not (a check would synchronise the device), so they must index the tensor's rows."""
    if flat.dim() != 2:
        raise ValueError(f"row_entropy_peak needs a 2-D (rows, vocab) tensor, got shape {tuple(flat.shape)}")
    flat = flat.detach()
    vocab = flat.shape[1] if vocab is None else vocab
    if not 1 <= vocab <= flat.shape[1]:
        raise ValueError(f"vocab must be in [1, {flat.shape[1]}], got {vocab}")
    if _triton_applies(flat):
        result = _row_entropy_peak_triton(flat, rows, vocab)
        if result is not None:
            return result
    if not _fast_path_applies(flat):
        return row_entropy_peak_reference(flat, rows, vocab)
    index = torch.arange(flat.shape[0]) if rows is None else rows.to("cpu", torch.int64)
    count = index.numel()
    entropy = torch.empty(count, dtype=torch.float32)
    peak = torch.empty(count, dtype=torch.float32)
    if count == 0:
        return entropy, peak
    if int(index.min()) < 0 or int(index.max()) >= flat.shape[0]:  # the kernel does not check bounds
        raise IndexError(f"rows must index the {flat.shape[0]} rows, got {int(index.min())}..{int(index.max())}")
    args = (flat.numpy(), index.numpy(), vocab)
    outs = (entropy.numpy(), peak.numpy())
    kernel = _kernel()
    run_over_rows(lambda start, end: kernel(*args, start, end, *outs), count, vocab)
    return entropy, peak
