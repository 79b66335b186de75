"""Rotary position embedding applied in place to q and k.

cos_sin_cache: [max_pos, rot_dim] with the cos half first, then the sin half
(rot_dim may be smaller than head_size: partial rotary). neox layout rotates the
two halves of the rotary dims; gptj layout rotates interleaved pairs.
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
from kernels.kv_write import CacheWrite, cache_write_launch, write_rotated_kv


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [T, H, rot_dim], cos/sin: [T, 1, rot_dim // 2]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotary_embedding_ref(
    positions: torch.Tensor,  # [T] int64
    query: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    key: torch.Tensor,  # [T, Hk * D] or [T, Hk, D]
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim] float32
    is_neox: bool,
    kv: CacheWrite | None = None,  # then write the rotated keys and the values to the cache
) -> None:
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, rot_dim // 2]
    for x in (query, key):
        v = x.view(x.shape[0], -1, head_size)
        rot = v[..., :rot_dim].float()
        v[..., :rot_dim] = _rotate(rot, cos, sin, is_neox).to(x.dtype)
    if kv is not None:
        kv.write_ref(key.view(key.shape[0], -1, head_size))


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's first head
    stride_h,
    cos,  # [1, R] float32
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IS_NEOX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        if IS_NEOX:  # pairs (i, i + rot_dim / 2): two contiguous halves
            r = tl.arange(0, BLOCK_R)
            mask = (h < NUM_HEADS)[:, None] & (r < HALF)[None, :]
            p1 = x_ptr + h[:, None] * stride_h + r[None, :]
            x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
            tl.store(p1, cast_to(x1 * cos - x2 * sin, dtype, INTERPRET), mask=mask)
            tl.store(p1 + HALF, cast_to(x2 * cos + x1 * sin, dtype, INTERPRET), mask=mask)
        else:  # interleaved pairs (2i, 2i + 1): load the rotary dims whole, then split
            c = tl.arange(0, 2 * BLOCK_R)
            mask = (h < NUM_HEADS)[:, None] & (c < 2 * HALF)[None, :]
            ptrs = x_ptr + h[:, None] * stride_h + c[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_R, 2]))
            y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)  # [H, R, 2]
            tl.store(
                ptrs, cast_to(tl.reshape(y, [BLOCK_H, 2 * BLOCK_R]), dtype, INTERPRET), mask=mask
            )


@triton.jit
def token_cos_sin(
    positions_ptr, cos_sin_ptr, stride_cache, token, HALF: tl.constexpr, BLOCK_R: tl.constexpr
):
    """The [1, R] float32 cos and sin rows of the token's position."""
    row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cache
    r = tl.arange(0, BLOCK_R)
    r_ok = r < HALF
    cos = tl.load(row + r, mask=r_ok, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + r, mask=r_ok, other=0.0).to(tl.float32)
    return cos[None, :], sin[None, :]


def head_blocks(num_q_heads: int, num_k_heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_HQ, BLOCK_HK): heads per step, about 2K elements of each half."""
    block_r = next_pow2(half)
    per_step = max(1, 2048 // block_r)
    return block_r, min(next_pow2(num_q_heads), per_step), min(next_pow2(num_k_heads), per_step)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_scale,
    v_scale,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IS_NEOX: tl.constexpr,
    WRITE_KV: tl.constexpr,  # then also store the keys and values in the cache (CacheWrite)
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # One token per program: read its cos/sin row once, rotate all q and k heads.
    token = tl.program_id(0).to(tl.int64)
    cos, sin = token_cos_sin(positions_ptr, cos_sin_ptr, stride_cache, token, HALF, BLOCK_R)
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, cos, sin,
        NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_R, IS_NEOX, INTERPRET,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, cos, sin,
        NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_R, IS_NEOX, INTERPRET,
    )  # fmt: skip
    if WRITE_KV:
        write_rotated_kv(
            token, k_ptr + token * stride_kt, stride_kh, value_ptr, k_cache_ptr, v_cache_ptr,
            slot_mapping_ptr, k_scale, v_scale, stride_vt, stride_vh,
            stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
            NUM_K_HEADS, HEAD_SIZE, BLOCK_HKV, BLOCK_D, BLOCK_SIZE, FP8, FP8_MAX, INTERPRET,
        )  # fmt: skip


def _heads_view(name: str, x: torch.Tensor, num_tokens: int, head_size: int) -> torch.Tensor:
    # [T, H * D] or [T, H, D] -> [T, H, D], sharing storage; tokens may be strided.
    check_dim(name, x, (2, 3))
    check_dtype(name, x, FLOAT_DTYPES)
    check_inner_contiguous(name, x)
    require(
        x.shape[0] == num_tokens,
        lambda: f"{name} has {x.shape[0]} tokens, positions has {num_tokens}",
    )
    if x.dim() == 3:
        require(x.shape[2] == head_size, lambda: f"{name}: head size {x.shape[2]} != {head_size}")
        return x
    require(
        x.shape[1] % head_size == 0,
        lambda: f"{name}: width {x.shape[1]} not a multiple of {head_size}",
    )
    return x.view(num_tokens, x.shape[1] // head_size, head_size)


def check_rotary_args(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch checks rotary kernels share; query and key as [T, H, D] views."""
    check_dim("positions", positions, (1,))
    check_dtype("positions", positions, (torch.int32, torch.int64))
    require(positions.is_contiguous(), "positions must be contiguous")
    check_dim("cos_sin_cache", cos_sin_cache, (2,))
    check_dtype("cos_sin_cache", cos_sin_cache, FLOAT_DTYPES)
    require(cos_sin_cache.is_contiguous(), "cos_sin_cache must be contiguous")
    rot_dim = cos_sin_cache.shape[1]
    require(
        rot_dim % 2 == 0 and 0 < rot_dim <= head_size,
        lambda: f"rot_dim {rot_dim} must be even and at most head_size {head_size}",
    )
    num_tokens = positions.shape[0]
    q = _heads_view("query", query, num_tokens, head_size)  # [T, Hq, D]
    k = _heads_view("key", key, num_tokens, head_size)  # [T, Hk, D]
    check_same_device(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    return q, k


def rotary_embedding_triton(
    positions: torch.Tensor,  # [T] int64
    query: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    key: torch.Tensor,  # [T, Hk * D] or [T, Hk, D]
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim] float32
    is_neox: bool,
    kv: CacheWrite | None = None,
) -> None:
    """Triton `rotary_embedding_ref`, in place on query and key (the last dim
    contiguous; tokens and heads may be strided, as in views of a fused qkv output).
    Positions must lie inside the cache (not checked on the device). Raises ValueError
    on bad shapes, strides or dtypes."""
    q, k = check_rotary_args(positions, query, key, head_size, cos_sin_cache)
    kv_args, kv_meta = cache_write_launch(kv, k)
    num_tokens, rot_dim = positions.shape[0], cos_sin_cache.shape[1]
    if num_tokens == 0:
        return
    half = rot_dim // 2
    block_r, block_hq, block_hk = head_blocks(q.shape[1], k.shape[1], half)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), *kv_args,
        NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HEAD_SIZE=head_size, HALF=half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r, IS_NEOX=is_neox,
        **kv_meta,
        INTERPRET=interpreting(), **pdl_launch(q), num_warps=4,
    )  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    kv: CacheWrite | None = None,
) -> None:
    """Rotate the first rot_dim dims of every q and k head in place, by position; with
    kv, then store the keys and values in the cache. Triton on CUDA,
    `rotary_embedding_ref` elsewhere (see kernels.dispatch)."""
    fn = rotary_embedding_triton if use_triton(query) else rotary_embedding_ref
    fn(positions, query, key, head_size, cos_sin_cache, is_neox, kv)
