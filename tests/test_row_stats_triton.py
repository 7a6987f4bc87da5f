"""The Triton row statistics of `dwakd.ops.row_stats` on CUDA (`ops._row_stats_triton`): entropy and peak against
the float64 PyTorch reference, under Triton's CPU interpreter (one child process: TRITON_INTERPRET is read when the
kernel is decorated) and on a GPU when one is present; and the fallback to the reference when Triton fails."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from _triton_helpers import compile_kernel, skip_unless_aot_compile

from dwakd.ops import row_stats
from dwakd.ops.row_stats import row_entropy_peak_reference
from dwakd.ops.soft_dtw.cuda import triton_available

CHILD_FLAG = "--interpreter-child"


def _awkward_rows(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Rows over 5,000 entries (more than one kernel block): spread and peaked logits, −inf entries, a NaN, a +inf,
    a row of only −inf, and head padding columns past the vocabulary (filled with values that must not count)."""
    g = torch.Generator().manual_seed(21)
    z = torch.randn(9, 5100, generator=g) * 4
    z[1] *= 30  # entries far below the maximum
    z[2, :3] += 60  # a near one-hot row
    z[3, :2500] = float("-inf")  # tokens ruled out
    z[4, 7] = float("nan")
    z[5, 9] = float("inf")
    z[6] = float("-inf")
    z[:, 5000:] = 1e4  # padding rows of the head: past `vocab`
    return z.to(device=device, dtype=dtype)


def _check(kernel, device: str = "cpu") -> None:
    """The kernel against the float64 reference: fp32 within 2e-6 (relative, or absolute near 0), bf16/fp16 input
    against the reference on the same rounded values, NaN exactly where the reference has NaN."""
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-6), (torch.float16, 2e-6)):
        z = _awkward_rows(dtype, device)
        for rows in (None, torch.tensor([8, 0, 3, 3, 6], device=device)):
            entropy, peak = kernel(z, rows, 5000)
            want_h, want_p = row_entropy_peak_reference(z.double(), rows, 5000)
            assert entropy.dtype == torch.float32 and peak.dtype == torch.float32
            torch.testing.assert_close(entropy.double(), want_h, rtol=tol, atol=tol, equal_nan=True)
            torch.testing.assert_close(peak.double(), want_p, rtol=tol, atol=tol, equal_nan=True)
    empty_h, empty_p = kernel(_awkward_rows(torch.float32, device), torch.zeros(0, dtype=torch.int64), 5000)
    assert empty_h.shape == (0,) and empty_p.shape == (0,)


def _run_child() -> None:
    import warnings

    from dwakd.ops._row_stats_triton import row_entropy_peak_triton

    warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy warns on the masked −inf lanes
    _check(row_entropy_peak_triton)
    print("ok")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_row_stats_under_the_interpreter() -> None:
    import dwakd

    src = str(Path(dwakd.__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([src, str(Path(__file__).parent)]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG], env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def test_a_failing_triton_falls_back_to_the_reference_with_one_warning(monkeypatch) -> None:
    """An import or compile failure at the kernel's first use warns once and leaves the PyTorch reference in charge."""

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setitem(sys.modules, "dwakd.ops._row_stats_triton",
                        types.SimpleNamespace(row_entropy_peak_triton=broken))  # fmt: skip
    monkeypatch.setattr(row_stats, "_TRITON_STATE", {})
    z = torch.randn(3, 40)
    with pytest.warns(RuntimeWarning, match="Triton kernel is unavailable here"):
        assert row_stats._row_entropy_peak_triton(z, None, 40) is None
    assert row_stats._TRITON_STATE == {"usable": False}
    assert not row_stats._triton_applies(z)  # a CPU tensor never takes it; a CUDA one no longer would either
    # once the kernel has run, a later error is an error, not a silent switch to the reference
    monkeypatch.setattr(row_stats, "_TRITON_STATE", {"usable": True})
    with pytest.raises(RuntimeError, match="no compiler"):
        row_stats._row_entropy_peak_triton(z, None, 40)
    assert row_stats._TRITON_STATE == {"usable": True}


def test_triton_row_stats_compile_for_sm80_and_sm90() -> None:
    """The kernel lowers to PTX for A100- and H100-class GPUs with each input dtype, with and without a row list."""
    skip_unless_aot_compile()
    from dwakd.ops._row_stats_triton import _BLOCK, _row_stats_kernel

    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            for has_rows in (False, True):
                types = {"z_ptr": f"*{dtype}", "rows_ptr": "*i64", "row_stride": "i64", "vocab": "i32",
                         "entropy_ptr": "*fp32", "peak_ptr": "*fp32"}  # fmt: skip
                compiled = compile_kernel(_row_stats_kernel, types, {"HAS_ROWS": has_rows, "BLOCK": _BLOCK}, arch, 8)
                assert ".entry" in compiled.asm["ptx"]


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")
def test_triton_row_stats_on_the_gpu() -> None:
    from dwakd.ops._row_stats_triton import row_entropy_peak_triton

    _check(row_entropy_peak_triton, "cuda")
    z = torch.randn(64, 151_646, device="cuda")
    assert row_stats._triton_applies(z)
    entropy, peak = row_stats.row_entropy_peak(z)
    want_h, want_p = row_entropy_peak_reference(z.double(), None, z.shape[1])
    torch.testing.assert_close(entropy.double(), want_h, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(peak.double(), want_p, rtol=2e-6, atol=2e-6)


if __name__ == "__main__" and CHILD_FLAG in sys.argv:
    _run_child()
