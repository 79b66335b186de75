"""Activations: the Triton kernels (interpreted) against the references in float64."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.activation import (
    gelu,
    gelu_new_ref,
    gelu_new_triton,
    gelu_ref,
    gelu_triton,
    relu_ref,
    relu_triton,
    silu_and_mul_ref,
    silu_and_mul_triton,
)
from tests.kernels.kernel_helpers import TOLERANCE, assert_close


@pytest.mark.parametrize(
    ("seed", "shape", "dtype", "strided"),
    [
        (1, (5, 2 * 1100), torch.float32, False),  # a row wider than one program's block
        (2, (3, 2 * 96), torch.bfloat16, True),
        (3, (2, 3, 2 * 64), torch.float16, False),
    ],
)
def test_silu_and_mul(seed: int, shape: tuple[int, ...], dtype: torch.dtype, strided: bool) -> None:
    torch.manual_seed(seed)
    if strided:  # rows of a wider buffer
        x = (torch.randn(shape[0], shape[1] + 10) * 3).to(dtype)[:, 3 : 3 + shape[1]]
    else:
        x = (torch.randn(shape) * 3).to(dtype)
    out = silu_and_mul_triton(x)
    assert out.dtype == dtype
    assert_close(out, silu_and_mul_ref(x.double()), TOLERANCE[dtype])


# exp(-2u) overflows to inf for very negative x: the right IEEE path (sigmoid -> 0), but
# the interpreter's numpy warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    ("triton_fn", "ref_fn"),
    [(gelu_triton, gelu_ref), (gelu_new_triton, gelu_new_ref), (relu_triton, relu_ref)],
)
@pytest.mark.parametrize(("seed", "dtype"), [(4, torch.float32), (5, torch.bfloat16)])
def test_elementwise(
    triton_fn: Callable[[torch.Tensor], torch.Tensor],
    ref_fn: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(seed)
    x = (torch.randn(7, 3, 100) * 4).to(dtype)  # 2100 elements: three programs, a ragged tail
    out = triton_fn(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref_fn(x.double()), TOLERANCE[dtype])


def test_public_function_on_cpu_runs_reference() -> None:
    torch.manual_seed(6)
    x = torch.randn(4, 50)
    assert torch.equal(gelu(x), gelu_ref(x))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(3, 7), "must be even"),
        (torch.randn(3, 8).int(), "x: dtype"),
        (torch.randn(8, 3).t(), "last dimension must be contiguous"),
        (torch.randn(2, 8, 3).transpose(1, 2), "must be contiguous"),
    ],
)
def test_silu_and_mul_rejects_bad_arguments(x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        silu_and_mul_triton(x)


def test_elementwise_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        gelu_triton(torch.randn(8, 3).t())
    with pytest.raises(ValueError, match="x: dtype"):
        relu_triton(torch.ones(3, dtype=torch.int64))
