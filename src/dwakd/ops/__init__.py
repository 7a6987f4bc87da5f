"""Numerical kernels kept apart from the losses: each has a plain PyTorch reference next to its fast path."""
