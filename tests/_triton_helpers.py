"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU (the bundled ptxas): what the CPU
interpreter cannot check (lowering, register allocation, the PTX itself)."""

from __future__ import annotations

import os

import pytest


def skip_unless_aot_compile() -> None:
    """Skip the calling test when Triton is missing, interpreting, or lacks the ahead-of-time API."""
    from dwakd.ops.soft_dtw.cuda import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("compiles the real kernels")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # the ahead-of-time API moved between Triton releases
        pytest.skip(f"no ASTSource/GPUTarget in this Triton: {exc}")


def compile_kernel(fn, types: dict[str, str], constexprs: dict, arch: int, num_warps: int):
    """Compile one kernel ahead of time for sm_<arch> (no GPU needed); returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
