"""The skinny GEMM (decode-sized linear layers): Triton, interpreted, against float64."""

from __future__ import annotations

import pytest
import torch

from kernels.skinny_gemm import (
    SKINNY_MAX_ROWS,
    linear,
    skinny_linear_ref,
    skinny_linear_triton,
    takes_skinny,
)
from tests.kernels.kernel_helpers import TOLERANCE, assert_close


def _operands(
    rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, strided: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = torch.randn(rows, k).to(dtype)
    if strided:  # rows of a wider buffer
        x = torch.randn(rows, k + 7).to(dtype)[:, 3 : 3 + k]
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize(
    ("seed", "rows", "n", "k", "dtype", "bias", "strided"),
    [
        (1, 1, 96, 512, torch.float32, False, False),  # whole K steps, whole column blocks
        (2, 5, 70, 300, torch.bfloat16, True, True),  # a ragged K step and column block
        (3, SKINNY_MAX_ROWS, 64, 40, torch.float16, True, False),  # every row; K under a step
    ],
)
def test_skinny_linear(
    seed: int, rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, strided: bool
) -> None:
    torch.manual_seed(seed)
    x, w, b = _operands(rows, n, k, dtype, bias, strided)
    out = skinny_linear_triton(x, w, b)
    assert out.dtype == dtype
    ref = skinny_linear_ref(x.double(), w.double(), b.double() if b is not None else None)
    assert_close(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("x", "w", "b", "match"),
    [
        (torch.randn(17, 8), torch.randn(4, 8), None, "at most 16"),
        (torch.randn(2, 8), torch.randn(4, 9), None, "features"),
        (torch.randn(2, 8), torch.randn(4, 8).half(), None, "weight is torch.float16"),
        (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias has 5"),
        (torch.randn(2, 8), torch.randn(8, 4).t(), None, "weight"),
    ],
)
def test_skinny_linear_refuses(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        skinny_linear_triton(x, w, b)


def test_linear_takes_the_kernel_for_few_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_KERNELS", "triton")
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    few, many = torch.randn(SKINNY_MAX_ROWS, 64), torch.randn(SKINNY_MAX_ROWS + 1, 64)
    assert takes_skinny(few, w) and not takes_skinny(many, w)
    assert not takes_skinny(few, w.t().contiguous().t())  # columns apart: cuBLAS
    assert_close(
        linear(few, w), skinny_linear_ref(few.double(), w.double()), TOLERANCE[torch.float32]
    )
    monkeypatch.setenv("TESSERA_KERNELS", "ref")
    assert not takes_skinny(few, w)
