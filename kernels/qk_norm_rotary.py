"""RMSNorm over every q and k head, then rotary embedding, in place, in one launch.

Qwen3 normalizes each head of q and k (weights [head_size], one for q and one for k)
before the rotation. Done apart, that is two copies (q and k are strided views of the
fused qkv output, which a row norm cannot take per head), two norms and the rotation:
five launches a layer where this is one, and in small decode steps each launch costs
more than its bytes. Neox layout only (the layout every such model uses).
"""

from __future__ import annotations

import torch

from kernels.dispatch import (
    FLOAT_DTYPES,
    cast_to,
    check_dim,
    check_dtype,
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
from kernels.norm import rms_norm_ref
from kernels.rotary import check_rotary_args, head_blocks, rotary_embedding_ref, token_cos_sin


def qk_norm_rotary_ref(
    positions: torch.Tensor,  # [T] int64
    query: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    key: torch.Tensor,  # [T, Hk * D] or [T, Hk, D]
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim] float32
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    eps: float,
    kv: CacheWrite | None = None,  # then write the keys and the values to the cache
) -> None:
    for x, weight in ((query, q_weight), (key, k_weight)):
        heads = x.view(x.shape[0], -1, head_size)  # [T, H, D], sharing storage
        heads.copy_(rms_norm_ref(heads, weight, eps))
    rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, True, kv)


@triton.jit
def _norm_rotate_heads(
    x_ptr,  # this token's first head
    stride_h,
    w_ptr,  # [D]
    eps,
    cos,  # [1, R] float32
    sin,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,  # rot_dim // 2
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,  # the dims past the rotary ones (partial rotary), else 0
    INTERPRET: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    r_ok = r < HALF
    w1 = tl.load(w_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < NUM_HEADS)[:, None] & r_ok[None, :]
        p1 = x_ptr + h[:, None] * stride_h + r[None, :]  # [H, R]: first half of the rotary dims
        x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
        squares = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)  # [H]
        if BLOCK_T > 0:
            t = tl.arange(0, BLOCK_T)
            mt = (h < NUM_HEADS)[:, None] & (t < HEAD_SIZE - 2 * HALF)[None, :]
            pt = x_ptr + h[:, None] * stride_h + 2 * HALF + t[None, :]
            xt = tl.load(pt, mask=mt, other=0.0).to(tl.float32)
            squares += tl.sum(xt * xt, 1)
        rstd = tl.rsqrt(squares / HEAD_SIZE + eps)[:, None]
        # The roundings of kernels.norm: normalized to the dtype, then times the weight.
        y1 = cast_to(cast_to(x1 * rstd, dtype, INTERPRET).to(tl.float32) * w1, dtype, INTERPRET)
        y2 = cast_to(cast_to(x2 * rstd, dtype, INTERPRET).to(tl.float32) * w2, dtype, INTERPRET)
        y1 = y1.to(tl.float32)
        y2 = y2.to(tl.float32)
        tl.store(p1, cast_to(y1 * cos - y2 * sin, dtype, INTERPRET), mask=m)
        tl.store(p1 + HALF, cast_to(y2 * cos + y1 * sin, dtype, INTERPRET), mask=m)
        if BLOCK_T > 0:
            wt = tl.load(w_ptr + 2 * HALF + t, mask=t < HEAD_SIZE - 2 * HALF, other=0.0)
            yt = cast_to(xt * rstd, dtype, INTERPRET).to(tl.float32) * wt.to(tl.float32)[None, :]
            tl.store(pt, cast_to(yt, dtype, INTERPRET), mask=mt)


@triton.jit
def _qk_norm_rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    eps,
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
    BLOCK_T: tl.constexpr,
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
    # One token per program, as kernels.rotary: its cos/sin row is read once.
    token = tl.program_id(0).to(tl.int64)
    cos, sin = token_cos_sin(positions_ptr, cos_sin_ptr, stride_cache, token, HALF, BLOCK_R)
    _norm_rotate_heads(
        q_ptr + token * stride_qt, stride_qh, q_weight_ptr, eps, cos, sin,
        NUM_Q_HEADS, HEAD_SIZE, HALF, BLOCK_HQ, BLOCK_R, BLOCK_T, INTERPRET,
    )  # fmt: skip
    _norm_rotate_heads(
        k_ptr + token * stride_kt, stride_kh, k_weight_ptr, eps, cos, sin,
        NUM_K_HEADS, HEAD_SIZE, HALF, BLOCK_HK, BLOCK_R, BLOCK_T, INTERPRET,
    )  # fmt: skip
    if WRITE_KV:
        write_rotated_kv(
            token, k_ptr + token * stride_kt, stride_kh, value_ptr, k_cache_ptr, v_cache_ptr,
            slot_mapping_ptr, k_scale, v_scale, stride_vt, stride_vh,
            stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
            NUM_K_HEADS, HEAD_SIZE, BLOCK_HKV, BLOCK_D, BLOCK_SIZE, FP8, FP8_MAX, INTERPRET,
        )  # fmt: skip


def _check_weight(name: str, w: torch.Tensor, head_size: int) -> None:
    check_dim(name, w, (1,))
    check_dtype(name, w, FLOAT_DTYPES)
    require(
        w.shape[0] == head_size and w.is_contiguous(),
        lambda: f"{name} must be contiguous with {head_size} elements, got {tuple(w.shape)}",
    )


def qk_norm_rotary_triton(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    kv: CacheWrite | None = None,
) -> None:
    """Triton `qk_norm_rotary_ref`, in place (strides as kernels.rotary takes them).
    Raises ValueError on bad shapes, strides or dtypes."""
    q, k = check_rotary_args(positions, query, key, head_size, cos_sin_cache)
    kv_args, kv_meta = cache_write_launch(kv, k)
    _check_weight("q_weight", q_weight, head_size)
    _check_weight("k_weight", k_weight, head_size)
    check_same_device(query=query, q_weight=q_weight, k_weight=k_weight)
    num_tokens, rot_dim = positions.shape[0], cos_sin_cache.shape[1]
    if num_tokens == 0:
        return
    half, tail = rot_dim // 2, head_size - rot_dim
    block_r, block_hq, block_hk = head_blocks(q.shape[1], k.shape[1], half)
    _qk_norm_rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q_weight, k_weight, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), *kv_args,
        NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HEAD_SIZE=head_size, HALF=half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r,
        BLOCK_T=next_pow2(tail) if tail else 0,
        **kv_meta,
        INTERPRET=interpreting(), **pdl_launch(q), num_warps=4,
    )  # fmt: skip


def qk_norm_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    kv: CacheWrite | None = None,
) -> None:
    """Normalize every q and k head, then rotate it (neox), in place; with kv, then
    store the keys and values in the cache. Triton on CUDA, `qk_norm_rotary_ref`
    elsewhere (see kernels.dispatch)."""
    fn = qk_norm_rotary_triton if use_triton(query) else qk_norm_rotary_ref
    fn(positions, query, key, head_size, cos_sin_cache, q_weight, k_weight, eps, kv)
