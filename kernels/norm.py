"""RMSNorm, optionally fused with the residual add.

`rms_norm_ref` / `fused_add_rms_norm_ref` are the PyTorch references; the Triton
kernels share their signatures. `rms_norm` / `fused_add_rms_norm` pick by device.
"""

from __future__ import annotations

import torch

from kernels.dispatch import (
    FLOAT_DTYPES,
    cast_to,
    check_dim,
    check_dtype,
    check_inner_contiguous,
    check_same_device,
    interpreting,
    next_pow2,
    pdl_launch,
    require,
    tl,
    triton,
    use_triton,
    wait_for_prior_kernel,
)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H], weight: [H] -> [T, H]; statistics in float32 whatever the dtype
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # residual <- x + residual; returns (rms_norm(residual), residual)
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # One row per program, statistics in float32. The roundings follow the reference:
    # the sum is rounded to the residual dtype before it is normalized, and the
    # normalized row is rounded to its input dtype before the weight multiplies it.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = cast_to(
            x.to(tl.float32) + r.to(tl.float32), residual_out_ptr.dtype.element_ty, INTERPRET
        )
        tl.store(residual_out_ptr + row * HIDDEN + cols, s, mask=mask)
        x = s
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = cast_to(xf * rstd, x.dtype, INTERPRET).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = cast_to(normed * w, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + row * HIDDEN + cols, y, mask=mask)


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    # [..., H] -> [R, H] without a copy: rows may be strided, the hidden dim may not.
    check_dim(name, t, tuple(range(1, 9)))
    check_inner_contiguous(name, t)
    if t.dim() == 2:
        return t
    require(t.is_contiguous(), lambda: f"{name}: a tensor of {t.dim()} dims must be contiguous")
    return t.view(-1, t.shape[-1])


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("weight", weight, FLOAT_DTYPES)
    check_dim("weight", weight, (1,))
    require(
        weight.shape[0] == hidden,
        lambda: f"weight has {weight.shape[0]} entries, hidden size is {hidden}",
    )
    require(weight.is_contiguous(), "weight must be contiguous")
    x2 = _rows("x", x)  # [R, H]
    r2 = x2
    x_dtype = x.dtype
    new_residual = None
    if residual is not None:
        check_dtype("residual", residual, FLOAT_DTYPES)
        require(
            residual.shape == x.shape,
            lambda: f"residual {tuple(residual.shape)} != x {tuple(x.shape)}",
        )
        check_same_device(x=x, residual=residual, weight=weight)
        r2 = _rows("residual", residual)
        x_dtype = torch.promote_types(x.dtype, residual.dtype)
        new_residual = torch.empty(x.shape, dtype=x_dtype, device=x.device)
    check_same_device(x=x, weight=weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x_dtype, weight.dtype), device=x.device)
    rows = x2.shape[0]
    if rows == 0 or hidden == 0:
        return out, new_residual
    block = next_pow2(hidden)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, out, new_residual if new_residual is not None else out,
        x2.stride(0), r2.stride(0), eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        INTERPRET=interpreting(), **pdl_launch(x2), num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip
    return out, new_residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `rms_norm_ref`. x: [..., H] with a contiguous last dim (a 2-D x may have
    strided rows), weight: [H]. Raises ValueError on bad shapes, strides or dtypes."""
    out, _ = _launch_rms_norm(x, None, weight, eps)
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `fused_add_rms_norm_ref`: one pass writes x + residual into a new tensor
    and its norm; returns (normed, new residual)."""
    out, new_residual = _launch_rms_norm(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim, statistics in float32. Triton on CUDA, the reference
    elsewhere (see kernels.dispatch)."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the inputs are left unchanged."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)
