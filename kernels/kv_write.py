"""Write new keys and values into the paged KV cache.

Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. A token's
slot is block_id * block_size + offset; slot -1 marks a padding token (skipped).
For an FP8 cache the values are divided by the per-tensor scale before the cast.
"""

from __future__ import annotations

import torch


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
            src = src.float() / scale
        cache.view(-1, hk, d)[slots] = src.to(cache.dtype)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    write_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
