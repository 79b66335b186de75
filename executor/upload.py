"""A step's small host arrays sent to the device in one copy per dtype.

A decode step used to send each of its inputs (token ids, positions, slots, sequence
lengths, query starts, block tables, the index of its pending tokens, the rows to
sample) with its own pinned staging buffer and copy: eight host-to-device copies, each
costing the worker's host tens of microseconds while the device may be waiting for the
step. Packing the arrays of one dtype into one buffer makes that one copy; the device
tensors handed back are views of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from executor.transfer import to_device

# Each view starts on a 64-byte boundary, as a tensor of its own would: Triton
# specializes kernels on 16-byte aligned pointers, and a misaligned view would compile
# (and run) another variant.
ALIGN_BYTES = 64


def send_packed(device: torch.device, dtype: type[np.integer], *arrays: Any) -> list[torch.Tensor]:
    """The arrays (or lists) on `device` as `dtype`, in one copy: a view each, in its shape."""
    dt = np.dtype(dtype)
    parts = [np.asarray(a, dtype=dt) for a in arrays]
    step = max(1, ALIGN_BYTES // dt.itemsize)
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += -(-part.size // step) * step
    packed = np.empty(max(total, 1), dtype=dt)
    for part, start in zip(parts, offsets, strict=True):
        packed[start : start + part.size] = part.reshape(-1)
    flat = to_device(torch.from_numpy(packed), device)
    return [
        flat[start : start + part.size].view(part.shape)
        for part, start in zip(parts, offsets, strict=True)
    ]
