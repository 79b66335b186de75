"""RMSNorm and fused add + RMSNorm: the Triton kernel (interpreted) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels.norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
)
from tests.kernels.kernel_helpers import TOLERANCE, assert_close

EPS = 1e-6


def make_x(shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> torch.Tensor:
    if strided:  # rows of a wider buffer: row stride != hidden size
        return (torch.randn(shape[0], shape[1] + 24) * 3).to(dtype)[:, 5 : 5 + shape[1]]
    return (torch.randn(shape) * 3).to(dtype)


@pytest.mark.parametrize(
    ("seed", "shape", "dtype", "weight_dtype", "strided"),
    [
        (1, (5, 96), torch.float32, torch.float32, False),  # hidden not a power of 2
        (2, (7, 128), torch.bfloat16, torch.bfloat16, True),
        (3, (2, 3, 64), torch.float16, torch.float16, False),  # [B, T, H]
        (4, (4, 200), torch.bfloat16, torch.float32, False),  # output promotes to fp32
    ],
)
def test_rms_norm(
    seed: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    weight_dtype: torch.dtype,
    strided: bool,
) -> None:
    torch.manual_seed(seed)
    x = make_x(shape, dtype, strided)
    weight = (torch.rand(shape[-1]) + 0.5).to(weight_dtype)
    out = rms_norm_triton(x, weight, EPS)
    ref = rms_norm_ref(x.double(), weight.double(), EPS)
    assert out.dtype == rms_norm_ref(x, weight, EPS).dtype
    assert_close(out, ref, TOLERANCE[dtype])  # x is rounded to its dtype mid-way


@pytest.mark.parametrize(
    ("seed", "dtype", "strided"),
    [(5, torch.float32, False), (6, torch.bfloat16, False), (7, torch.float16, True)],
)
def test_fused_add_rms_norm(seed: int, dtype: torch.dtype, strided: bool) -> None:
    torch.manual_seed(seed)
    x = make_x((6, 160), dtype, strided)
    residual = make_x((6, 160), dtype, strided)
    x_before, residual_before = x.clone(), residual.clone()
    weight = (torch.rand(160) + 0.5).to(dtype)
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, EPS)
    # The residual sum is rounded to its dtype once: equal to the reference's, bit for bit.
    assert torch.equal(new_residual, x + residual)
    ref_out, ref_residual = fused_add_rms_norm_ref(
        x.double(), residual.double(), weight.double(), EPS
    )
    assert_close(new_residual, ref_residual, TOLERANCE[dtype])
    assert_close(out, ref_out, TOLERANCE[dtype])
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_public_functions_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(8)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    weight = torch.rand(64)
    # On the CPU the reference runs: equal bit for bit.
    assert torch.equal(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))
    out, res = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)
    # Forced onto Triton (interpreted here): same values up to float32 rounding.
    monkeypatch.setenv("TESSERA_KERNELS", "triton")
    ref = rms_norm_ref(x.double(), weight.double(), EPS)
    assert_close(rms_norm(x, weight, EPS), ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    ("x", "weight", "message"),
    [
        (torch.randn(3, 64).int(), torch.rand(64), "x: dtype"),
        (torch.randn(3, 64), torch.rand(32), "hidden size is 64"),
        (torch.randn(64, 3).t(), torch.rand(64), "last dimension must be contiguous"),
        (torch.randn(2, 64, 3).transpose(1, 2), torch.rand(64), "contiguous"),
        (torch.randn(3, 64), torch.rand(64).double(), "weight: dtype"),
    ],
)
def test_rejects_bad_arguments(x: torch.Tensor, weight: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rms_norm_triton(x, weight, EPS)


def test_fused_rejects_residual_shape() -> None:
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm_triton(torch.randn(3, 64), torch.randn(4, 64), torch.rand(64), EPS)
