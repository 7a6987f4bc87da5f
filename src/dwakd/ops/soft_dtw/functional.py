"""Public Soft-DTW entry points: argument checks, dispatch between the reference and the fast paths, divergence."""

from __future__ import annotations

import torch

from dwakd.ops._transfer import to_device
from dwakd.ops.soft_dtw.band import SoftBand
from dwakd.ops.soft_dtw.cost import COSINE_EPS, divergence_costs, unit_rows
from dwakd.ops.soft_dtw.reference import soft_dtw_reference

IMPLS = ("auto", "reference", "cpu", "cuda")
MAX_GAMMA = 1e6  # the DP boundary is a finite 1e10 that must stay "infinitely" far in units of γ


def _check_lengths(
    lengths: torch.Tensor | None, batch: int, size: int, name: str, device: torch.device
) -> torch.Tensor:
    """Validated (batch,) int64 lengths on `device`, each in [1, size]; None means every sample is full.

    Lengths given on the CPU are checked there and copied without a stream sync (`ops._transfer`); lengths on a GPU
    cost one sync, to read their range.
    """
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    if not lengths.numel():
        lo, hi = 1, size
    elif lengths.device.type == "cpu":
        values = lengths.numpy()
        lo, hi = int(values.min()), int(values.max())
    else:
        lo, hi = torch.stack([lengths.min(), lengths.max()]).tolist()  # one device sync
    if lo < 1 or hi > size:
        raise ValueError(f"{name} must lie in [1, {size}], got values in [{lo}, {hi}]")
    return to_device(lengths.to(dtype=torch.long), device)


def _check_gamma(gamma: float) -> None:
    """γ must lie in (0, MAX_GAMMA]."""
    if not 0 < gamma <= MAX_GAMMA:
        raise ValueError(f"gamma must be in (0, {MAX_GAMMA:g}], got {gamma}")


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn 'auto' into the fastest path for `device` that keeps `dtype`'s precision.

    CPU: numba kernels. CUDA: Triton kernels when Triton imports (float32 maths, so float64 costs keep the
    reference); anything else: the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and dtype != torch.float64:
            from dwakd.ops.soft_dtw.cuda import triton_available

            if triton_available() and cuda_path_verified(device):
                return "cuda"
        return "reference"
    return impl


_VERIFIED: dict[str, bool] = {}


def cuda_path_verified(device: torch.device) -> bool:
    """Whether the Triton kernels match the reference on `device` (checked once per device and process).

    `impl="auto"` only trusts a compiled GPU kernel after it reproduced the plain-PyTorch reference (values and
    gradients, ragged lengths, a band, three groups in one launch) on this very GPU and Triton version; on a
    mismatch or a compile error it warns once and keeps the reference, so a broken kernel costs speed, not
    correctness. `impl="cuda"` skips this check.
    """
    key = str(device)
    if key not in _VERIFIED:
        _VERIFIED[key] = _self_check(device)
    return _VERIFIED[key]


def _self_check(device: torch.device) -> bool:
    """Run a small three-group problem through the Triton path and the reference and compare them."""
    import warnings

    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(3, 37, 29), (3, 37, 37), (3, 29, 29)]
    costs = [torch.rand(shape, generator=gen, dtype=torch.float32).to(device) for shape in shapes]
    lx = torch.tensor([37, 20, 1], device=device)
    ly = torch.tensor([29, 29, 7], device=device)
    lengths = [(lx, ly), (lx, lx), (ly, ly)]
    band = SoftBand(torch.linspace(0, 28, 37).repeat(3, 1).to(device), torch.full((3, 37), 4.0, device=device), 0.5)
    try:
        results = {}
        for path in ("cuda", "reference"):
            inputs = [c.clone().requires_grad_(True) for c in costs]
            values = _run_groups(path, inputs, lengths, 0.1, band)
            torch.stack([v.sum() for v in values]).sum().backward()
            results[path] = ([v.detach() for v in values], [c.grad for c in inputs])
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-4)
                 for kind in (0, 1) for a, b in zip(results["cuda"][kind], results["reference"][kind]))
        detail = "values or gradients differ from the reference"
    except Exception as error:  # noqa: BLE001 - any failure means: do not trust the kernel
        ok, detail = False, f"{type(error).__name__}: {error}"
    if not ok:
        warnings.warn(f"Soft-DTW: the Triton kernels failed their self-check on {device} ({detail}); "
                      "impl='auto' uses the PyTorch reference there", RuntimeWarning, stacklevel=3)
    return ok


def _run_groups(
    path: str,
    costs: list[torch.Tensor],
    lengths: list[tuple[torch.Tensor, torch.Tensor]],
    gamma: float,
    band: SoftBand | None,
    symmetric: tuple[bool, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """Soft-DTW of several cost batches on one path; the band applies to the first batch only.

    `symmetric[g]` says that batch g's costs are symmetric with equal lengths per sample (a self term): the CPU
    path then sweeps only half of each grid; the other paths compute the full grid either way.
    """
    if path == "reference":
        return tuple(
            soft_dtw_reference(c, gamma, lx, ly, band if g == 0 else None)
            for g, (c, (lx, ly)) in enumerate(zip(costs, lengths))
        )
    if path == "cpu":
        from dwakd.ops.soft_dtw.cpu import soft_dtw_cpu_groups

        return soft_dtw_cpu_groups(costs, lengths, gamma, band, symmetric)
    from dwakd.ops.soft_dtw.cuda import soft_dtw_cuda_groups

    return soft_dtw_cuda_groups(costs, lengths, gamma, band)


def soft_dtw(
    cost: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
    band: SoftBand | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Soft-DTW R(n_b, m_b) of each (batch, N, M) cost matrix, (batch,), differentiable w.r.t. `cost`."""
    if cost.dim() != 3:
        raise ValueError(f"cost must be (batch, N, M), got shape {tuple(cost.shape)}")
    _check_gamma(gamma)
    batch, n_rows, n_cols = cost.shape
    lengths_x = _check_lengths(lengths_x, batch, n_rows, "lengths_x", cost.device)
    lengths_y = _check_lengths(lengths_y, batch, n_cols, "lengths_y", cost.device)
    if band is not None:
        band.validate(batch, n_rows)
    path = _resolve_impl(impl, cost.device, cost.dtype)
    if batch == 0:
        return cost.sum(dim=(1, 2))  # (0,), still attached to the graph
    return _run_groups(path, [cost], [(lengths_x, lengths_y)], float(gamma), band)[0]


def _fused_cpu_divergence(impl: str, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the divergence takes the fused CPU path (`cpu.cosine_divergence_cpu`: costs, DPs and the gradient
    from E to the unit vectors in one autograd node): CPU float32 or float64 inputs outside autocast, the CPU path
    asked for or chosen by "auto". Elsewhere the costs are formed by `divergence_costs` and differentiated as
    tensors (under autocast they are formed in its dtype)."""
    return (impl in ("auto", "cpu") and x.device.type == "cpu" and y.device.type == "cpu" and x.dtype == y.dtype
            and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu"))


def soft_dtw_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
    band: SoftBand | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """D = sdtw(C̃_xy) − ½(sdtw(C_xx) + sdtw(C_yy)) with cosine costs, (batch,); the band only on the cross term."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (batch, len, dim) with one batch, got {tuple(x.shape)} and {tuple(y.shape)}")
    _check_gamma(gamma)
    batch, n_rows, n_cols = x.shape[0], x.shape[1], y.shape[1]
    lengths_x = _check_lengths(lengths_x, batch, n_rows, "lengths_x", x.device)
    lengths_y = _check_lengths(lengths_y, batch, n_cols, "lengths_y", x.device)
    if band is not None:
        band.validate(batch, n_rows)
    if batch == 0:
        return x.sum(dim=(1, 2)) + y.sum(dim=(1, 2))  # (0,), still attached to the graph
    if _fused_cpu_divergence(impl, x, y):
        from dwakd.ops.soft_dtw.cpu import cosine_divergence_cpu

        ux, uy = unit_rows(x, COSINE_EPS), unit_rows(y, COSINE_EPS)
        cross, self_x, self_y = cosine_divergence_cpu(ux, uy, lengths_x, lengths_y, float(gamma), band)
    else:
        # (batch, N, M), (batch, N, N), (batch, M, M); the self terms' E is symmetric (R(Cᵀ) = R(C), equal lengths)
        cost_xy, cost_xx, cost_yy = divergence_costs(x, y, COSINE_EPS, symmetric_self_grad=True)
        path = _resolve_impl(impl, x.device, cost_xy.dtype)
        # the three DPs run as one batch of 3·batch tasks on the fast paths; the self terms are symmetric
        cross, self_x, self_y = _run_groups(
            path,
            [cost_xy, cost_xx, cost_yy],
            [(lengths_x, lengths_y), (lengths_x, lengths_x), (lengths_y, lengths_y)],
            float(gamma),
            band,
            symmetric=(False, True, True),
        )
    return cross - 0.5 * (self_x + self_y)
