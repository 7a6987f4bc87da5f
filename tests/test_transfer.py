"""ops._transfer.to_device: host index/length tensors reach the device without synchronising the stream."""

from __future__ import annotations

import pytest
import torch

from dwakd.ops._transfer import to_device


def test_cpu_target_returns_the_tensor_itself() -> None:
    values = torch.tensor([3, 1, 2])
    assert to_device(values, "cpu") is values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_to_the_gpu_does_not_wait_for_queued_kernels() -> None:
    """Behind a kernel that keeps the GPU busy for ~1 s, the copy returns at once (the stream is still busy when it
    does) and the values arrive; a blocking `.to("cuda")` would return only after the kernel."""
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ≈ 1 s of GPU time at ~2 GHz
    copied = to_device(torch.tensor([5, 7, 11]), "cuda")
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "the copy waited for the queued kernel"
    assert copied.tolist() == [5, 7, 11]
