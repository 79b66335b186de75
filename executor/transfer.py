"""Copies between host and device that never make the host wait for the device."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`, the copy queued on the current stream.

    A copy from pageable memory returns only once the stream has reached it (the
    driver stages it through a pinned buffer of its own), so the host would wait for
    the step before to finish: the overlap of the next step's preparation with the
    running one is lost. On CUDA the tensor goes through pinned memory instead
    (PyTorch's caching host allocator keeps that buffer until the copy is done).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued without waiting (into pinned memory on
    CUDA: record an event after it and wait on that before reading)."""
    return t.to("cpu", non_blocking=True) if t.is_cuda else t
