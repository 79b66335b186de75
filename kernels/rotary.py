"""Rotary position embedding applied in place to q and k.

cos_sin_cache: [max_pos, rot_dim] with the cos half first, then the sin half
(rot_dim may be smaller than head_size: partial rotary). neox layout rotates the
two halves of the rotary dims; gptj layout rotates interleaved pairs.
"""

from __future__ import annotations

import torch


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
) -> None:
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, rot_dim // 2]
    for x in (query, key):
        v = x.view(x.shape[0], -1, head_size)
        rot = v[..., :rot_dim].float()
        v[..., :rot_dim] = _rotate(rot, cos, sin, is_neox).to(x.dtype)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, is_neox)
