"""Row-wise helpers shared by the divergences (`dwakd.modules.divergences`) and the kernels' plain references
(`dwakd.ops.row_stats`): chunking over rows, the compute dtype, log-probabilities with −inf clamped, row dot
products. Kept apart so that the kernels' references do not import the divergences that call the kernels."""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 1 << 24  # fp32 elements per (rows, vocab) temporary: 64 MiB


def chunk_rows(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so one (rows, vocab) fp32 temporary holds about `chunk_elements` values."""
    return max(1, chunk_elements // max(1, vocab))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype otherwise (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def no_autocast(x: torch.Tensor) -> torch.autocast:
    """Context that turns autocast off on x's device: these reductions must not drop to bf16 (einsum would)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def iter_row_chunks(
    x: torch.Tensor, rows: torch.Tensor | None, chunk: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, end, chunk in at least fp32) over the selected rows of a 2-D tensor (all when `rows` is None)."""
    dtype = compute_dtype(x)
    total = x.shape[0] if rows is None else rows.numel()
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        part = x[start:end] if rows is None else x.index_select(0, rows[start:end])
        yield start, end, part.to(dtype)
        del part  # a copy (index_select, cast) must not outlive its chunk while the next one is made


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row (rows,), without a (rows, vocab) product temporary."""
    return torch.einsum("rv,rv->r", a, b)


def log_probs(x: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(x / τ) as a new tensor, −inf clamped to the dtype's lowest finite value.

    The clamp keeps 0·log 0 terms at 0 (instead of NaN) for tokens a distribution rules out with −inf logits,
    without a masked select per term.
    """
    scaled = x * (1.0 / tau) if tau != 1.0 else x
    out = torch.log_softmax(scaled, -1)
    return out.clamp_(min=torch.finfo(out.dtype).min)
