"""Write new keys and values into the paged KV cache.

Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. A token's
slot is block_id * block_size + offset; slot -1 marks a padding token (skipped).
For an FP8 cache the values are divided by the per-tensor scale before the cast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.dispatch import (
    FLOAT_DTYPES,
    FP8_DTYPES,
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


def write_kv_ref(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    k_cache: torch.Tensor,  # [N, B, Hk, D]
    v_cache: torch.Tensor,  # [N, B, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int64
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    hk, d = k_cache.shape[-2:]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for src, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        src = src[valid]
        if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            # saturate: a cast beyond the FP8 range gives NaN, not the largest value
            fp8_max = torch.finfo(cache.dtype).max
            src = (src.float() / scale).clamp(-fp8_max, fp8_max)
        cache.view(-1, hk, d)[slots] = src.to(cache.dtype)


@triton.jit
def store_token_kv(
    k_row,  # this token's first key head
    v_row,
    stride_kh,
    stride_vh,
    k_cache_ptr,
    v_cache_ptr,
    slot,  # int64, >= 0
    k_scale,
    v_scale,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    h,  # [H] heads
    d,  # [D] dims
    mask,  # [H, D]
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,  # saturation bound of the FP8 cache type (0.0 otherwise)
    INTERPRET: tl.constexpr,
):
    """Copy heads `h` of one token's key and value rows into its cache slot."""
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    k = tl.load(k_row + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_row + h[:, None] * stride_vh + d[None, :], mask=mask)
    if FP8:
        # Exact division, as the reference does, before the one rounding to FP8.
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -FP8_MAX, FP8_MAX)
    k_dst = block * stride_kcb + offset * stride_kct + h[:, None] * stride_kch + d[None, :]
    v_dst = block * stride_vcb + offset * stride_vct + h[:, None] * stride_vch + d[None, :]
    tl.store(k_cache_ptr + k_dst, cast_to(k, k_cache_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(v_cache_ptr + v_dst, cast_to(v, v_cache_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_scale,
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # One program copies BLOCK_H heads of one token's key and value rows into its slot.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    src_t = token.to(tl.int64)
    store_token_kv(
        key_ptr + src_t * stride_kt, value_ptr + src_t * stride_vt, stride_kh, stride_vh,
        k_cache_ptr, v_cache_ptr, slot, k_scale, v_scale,
        stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
        h, d, mask, BLOCK_SIZE, FP8, FP8_MAX, INTERPRET,
    )  # fmt: skip


@triton.jit
def write_rotated_kv(
    token,  # int64
    k_row,  # this token's first key head, just written by this program
    stride_kh,
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
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The tail of a rotary kernel's program (see CacheWrite): store the token's keys,
    which its threads have just rotated in place, and its values into its cache slot."""
    tl.debug_barrier()  # the rotated keys, stored by every thread, are visible to all
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_HKV)
        d = tl.arange(0, BLOCK_D)
        mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        store_token_kv(
            k_row, value_ptr + token * stride_vt, stride_kh, stride_vh,
            k_cache_ptr, v_cache_ptr, slot, k_scale, v_scale,
            stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
            h, d, mask, BLOCK_SIZE, FP8, FP8_MAX, INTERPRET,
        )  # fmt: skip


@dataclass(frozen=True)
class CacheWrite:
    """The cache write a kernel that makes the keys does as it finishes them.

    The rotary kernels take one (`kv=`) and store each token's rotated keys and its
    values into its slot, as `write_kv` would after them: one launch a layer fewer.
    """

    value: torch.Tensor  # [T, Hk, D]
    k_cache: torch.Tensor  # [N, B, Hk, D]
    v_cache: torch.Tensor  # [N, B, Hk, D]
    slot_mapping: torch.Tensor  # [T]
    k_scale: float = 1.0
    v_scale: float = 1.0

    def write_ref(self, key: torch.Tensor) -> None:
        """`write_kv_ref` of key ([T, Hk, D] views) and the values."""
        write_kv_ref(
            key, self.value, self.k_cache, self.v_cache, self.slot_mapping, self.k_scale,
            self.v_scale,
        )  # fmt: skip


def _fp8_bound(cache_dtype: torch.dtype) -> tuple[bool, float]:
    """(FP8, FP8_MAX) of the write kernels: whether the cache is FP8, and its saturation."""
    fp8 = cache_dtype in FP8_DTYPES
    return fp8, float(torch.finfo(cache_dtype).max) if fp8 else 0.0


def cache_write_launch(
    kv: CacheWrite | None, key: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A rotary kernel's launch arguments for write_rotated_kv: the positional ones after
    its own (checked against key, [T, Hk, D]), and the constexprs. Without kv,
    placeholders and WRITE_KV=False."""
    if kv is None:
        meta: dict[str, Any] = {
            "WRITE_KV": False, "BLOCK_HKV": 1, "BLOCK_D": 1, "BLOCK_SIZE": 1, "FP8": False,
            "FP8_MAX": 0.0,
        }  # fmt: skip
        return (key, key, key, key, 1.0, 1.0) + (0,) * 8, meta
    _check_write_kv_args(key, kv.value, kv.k_cache, kv.v_cache, kv.slot_mapping)
    kc, vc, v = kv.k_cache, kv.v_cache, kv.value
    args = (
        v, kc, vc, kv.slot_mapping, kv.k_scale, kv.v_scale, v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
    )  # fmt: skip
    fp8, fp8_max = _fp8_bound(kc.dtype)
    hk, d = kc.shape[2:]
    meta = {
        "WRITE_KV": True, "BLOCK_HKV": next_pow2(hk), "BLOCK_D": next_pow2(d),
        "BLOCK_SIZE": kc.shape[1], "FP8": fp8, "FP8_MAX": fp8_max,
    }  # fmt: skip
    return args, meta


def _check_write_kv_args(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check_dim("key", key, (3,))
    check_dim("k_cache", k_cache, (4,))
    require(
        value.shape == key.shape, lambda: f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    )
    require(
        v_cache.shape == k_cache.shape,
        lambda: f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}",
    )
    require(
        key.shape[1:] == k_cache.shape[2:],
        lambda: f"key heads/head size {tuple(key.shape[1:])} != cache {tuple(k_cache.shape[2:])}",
    )
    check_dim("slot_mapping", slot_mapping, (1,))
    require(slot_mapping.shape[0] == key.shape[0], "slot_mapping must have one entry per token")
    check_dtype("slot_mapping", slot_mapping, (torch.int32, torch.int64))
    require(slot_mapping.is_contiguous(), "slot_mapping must be contiguous")
    check_dtype("key", key, FLOAT_DTYPES)
    check_dtype("value", value, FLOAT_DTYPES)
    check_dtype("k_cache", k_cache, FLOAT_DTYPES + FP8_DTYPES)
    require(
        v_cache.dtype == k_cache.dtype,
        lambda: f"v_cache {v_cache.dtype} != k_cache {k_cache.dtype}",
    )
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_inner_contiguous(name, t)
    check_same_device(
        key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )


def write_kv_triton(
    key: torch.Tensor,  # [T, Hk, D], any token/head strides
    value: torch.Tensor,  # [T, Hk, D]
    k_cache: torch.Tensor,  # [N, B, Hk, D]
    v_cache: torch.Tensor,  # [N, B, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int64
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton `write_kv_ref`. Slots must lie inside the cache (not checked on the
    device). Raises ValueError on bad shapes, strides or dtypes."""
    _check_write_kv_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_d = next_pow2(head_dim)
    # About 4K elements (8 KB of bf16) per program: whole tokens for common shapes.
    block_h = min(next_pow2(num_kv_heads), max(1, 4096 // block_d))
    grid = (num_tokens, -(-num_kv_heads // block_h))
    fp8, fp8_max = _fp8_bound(k_cache.dtype)
    _write_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8, FP8_MAX=fp8_max,
        INTERPRET=interpreting(), **pdl_launch(key), num_warps=4,
    )  # fmt: skip


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's key and value rows into its cache slot (slot < 0: skipped).
    Triton on CUDA, `write_kv_ref` elsewhere (see kernels.dispatch)."""
    if use_triton(key):
        write_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        write_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
