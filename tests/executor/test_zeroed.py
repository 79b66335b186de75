"""KV cache memory on the CPU: zeros from calloc'd memory, of every cache dtype."""

from __future__ import annotations

import pytest
import torch

from executor.model_runner import zeroed


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_zeroed_is_zero_contiguous_and_writable(dtype):
    shape = (2, 5, 16, 2, 8)
    t = zeroed(shape, dtype, torch.device("cpu"))
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.float().abs().sum().item() == 0.0
    t[1, 4, 15, 1, 7] = 2.0
    assert t.float().sum().item() == 2.0
    assert zeroed((0,), dtype, torch.device("cpu")).numel() == 0
