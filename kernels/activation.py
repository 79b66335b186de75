"""Gated and plain activations. References here; Triton kernels share the signatures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import (
    FLOAT_DTYPES,
    cast_to,
    check_dim,
    check_dtype,
    check_inner_contiguous,
    interpreting,
    next_pow2,
    pdl_launch,
    require,
    tl,
    triton,
    use_triton,
    wait_for_prior_kernel,
)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2 * I] (gate | up) -> [T, I]
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_new_ref(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def relu_ref(x: torch.Tensor) -> torch.Tensor:
    # OPT uses plain ReLU
    return F.relu(x)


BLOCK = 1024  # elements per program of the elementwise kernels


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    width,
    BLOCK_I: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # Program (row, j) makes out[row, j*BLOCK_I : (j+1)*BLOCK_I] from the gate and up halves.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Rounded to the input dtype between the two steps, as the reference does.
    act = cast_to(g * tl.sigmoid(g), gate.dtype, INTERPRET).to(tl.float32)
    out = cast_to(act * up.to(tl.float32), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + row * width + cols, out, mask=mask)


@triton.jit
def _activation_kernel(
    x_ptr,
    out_ptr,
    numel,
    KIND: tl.constexpr,  # 0 gelu (erf), 1 gelu_new (tanh), 2 relu
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
    elif KIND == 1:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no cancellation for large negative x
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (...)
        y = x * tl.sigmoid(2.0 * u)
    else:
        y = tl.where(x < 0.0, 0.0, x)  # keeps NaN, as F.relu does
    tl.store(out_ptr + offs, cast_to(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton `silu_and_mul_ref`: x [..., 2 * I] (gate | up) -> [..., I]. A 2-D x may
    have strided rows; more dims must be contiguous. Raises ValueError otherwise."""
    check_dim("x", x, tuple(range(1, 9)))
    check_dtype("x", x, FLOAT_DTYPES)
    check_inner_contiguous("x", x)
    require(x.shape[-1] % 2 == 0, lambda: f"x: last dim {x.shape[-1]} must be even (gate | up)")
    width = x.shape[-1] // 2
    if x.dim() != 2:
        require(x.is_contiguous(), lambda: f"x: a tensor of {x.dim()} dims must be contiguous")
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # [R, 2I]
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(next_pow2(width), BLOCK)
    grid = (x2.shape[0], -(-width // block))
    _silu_and_mul_kernel[grid](
        x2,
        out,
        x2.stride(0),
        width,
        BLOCK_I=block,
        INTERPRET=interpreting(),
        **pdl_launch(x2),
        num_warps=4,
    )
    return out


def _elementwise(x: torch.Tensor, kind: int) -> torch.Tensor:
    check_dtype("x", x, FLOAT_DTYPES)
    require(x.is_contiguous(), "x must be contiguous")
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    _activation_kernel[(-(-n // BLOCK),)](
        x, out, n, KIND=kind, BLOCK_E=BLOCK, INTERPRET=interpreting(), **pdl_launch(x), num_warps=4
    )
    return out


def gelu_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton `gelu_ref` (exact, erf). x: any shape, contiguous."""
    return _elementwise(x, 0)


def gelu_new_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton `gelu_new_ref` (GPT-2's tanh form), computed in float32."""
    return _elementwise(x, 1)


def relu_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton `relu_ref`."""
    return _elementwise(x, 2)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up]; Triton on CUDA, the reference elsewhere."""
    return silu_and_mul_triton(x) if use_triton(x) else silu_and_mul_ref(x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return gelu_new_triton(x) if use_triton(x) else gelu_new_ref(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return gelu_triton(x) if use_triton(x) else gelu_ref(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    return relu_triton(x) if use_triton(x) else relu_ref(x)
