"""Rotary position embedding with a precomputed cos/sin cache.

`RotaryEmbedding` owns cos_sin_cache [cache_len, rotary_dim] float32 (cos half, then
sin half) and rotates q and k in place through the `kernels.rotary` kernel. The
scaling types follow the Hugging Face definitions (rope_type none/default, linear,
dynamic, llama3, yarn); `executor.rope_config.rope_settings` reads them from an HF config dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from executor.layers.norm import RMSNorm
from executor.rope_config import SUPPORTED_ROPE_TYPES, rope_type_of
from kernels.kv_write import CacheWrite
from kernels.qk_norm_rotary import qk_norm_rotary
from kernels.rotary import rotary_embedding


@dataclass(frozen=True)
class RopeFrequencies:
    inv_freq: torch.Tensor  # [rotary_dim // 2] float32
    attention_factor: float  # cos and sin are scaled by it (yarn)
    cache_len: int  # positions the cache must cover


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base**exponents)  # [rotary_dim // 2]


def _dynamic_ntk(rotary_dim: int, base: float, max_position: int, factor: float) -> RopeFrequencies:
    # Fixed NTK-scaled base, computed once for the longest context the model serves
    # (max_position * factor), instead of per sequence length as HF does on the fly.
    cache_len = int(max_position * factor)
    scaled = base * ((factor * cache_len / max_position) - (factor - 1)) ** (
        rotary_dim / (rotary_dim - 2)
    )
    return RopeFrequencies(_base_inv_freq(rotary_dim, scaled), 1.0, cache_len)


def _llama3(rotary_dim: int, base: float, max_position: int, s: dict[str, Any]) -> RopeFrequencies:
    inv_freq = _base_inv_freq(rotary_dim, base)
    factor = s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", max_position)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are divided by factor, short ones kept,
    # and the band between them blends the two smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return RopeFrequencies(torch.where(middle, blended, scaled), 1.0, max_position)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The rotary dimension whose wavelength makes `rotations` turns over max_pos.
    return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn(rotary_dim: int, base: float, max_position: int, s: dict[str, Any]) -> RopeFrequencies:
    original = s.get("original_max_position_embeddings") or max_position
    factor = s.get("factor") or max_position / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    low = _yarn_correction_dim(beta_fast, rotary_dim, base, original)
    high = _yarn_correction_dim(beta_slow, rotary_dim, base, original)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # keep the ramp finite
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by factor
    base_freq = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    inv_freq = (1.0 / (factor * base_freq)) * (1 - extrapolate) + (1.0 / base_freq) * extrapolate
    cache_len = max(max_position, int(original * factor))
    return RopeFrequencies(inv_freq, float(attention_factor), cache_len)


def rope_frequencies(
    rotary_dim: int, base: float, max_position: int, scaling: dict[str, Any] | None
) -> RopeFrequencies:
    """Inverse frequencies, cos/sin factor and cache length for one rope scaling."""
    s = scaling or {}
    rope_type = rope_type_of(s)
    if rope_type == "default":
        return RopeFrequencies(_base_inv_freq(rotary_dim, base), 1.0, max_position)
    if rope_type == "linear":
        factor = s["factor"]
        inv_freq = _base_inv_freq(rotary_dim, base) / factor
        return RopeFrequencies(inv_freq, 1.0, int(max_position * factor))
    if rope_type == "dynamic":
        return _dynamic_ntk(rotary_dim, base, max_position, s["factor"])
    if rope_type == "llama3":
        return _llama3(rotary_dim, base, max_position, s)
    if rope_type == "yarn":
        return _yarn(rotary_dim, base, max_position, s)
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def build_cos_sin_cache(freqs: RopeFrequencies, device: torch.device | None = None) -> torch.Tensor:
    positions = torch.arange(freqs.cache_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, freqs.inv_freq.to(device))  # [L, rotary_dim // 2]
    scale = freqs.attention_factor
    return torch.cat((angles.cos() * scale, angles.sin() * scale), dim=-1)  # [L, rotary_dim]


class RotaryEmbedding(nn.Module):
    """Rotates the first `rotary_dim` dims of each q/k head by its token's position.

    is_neox=True rotates the two halves of the rotary dims (Llama/HF layout);
    is_neox=False rotates interleaved pairs (GPT-J layout).
    """

    cos_sin_cache: torch.Tensor

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        is_neox: bool = True,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox = is_neox
        freqs = rope_frequencies(rotary_dim, base, max_position, scaling)
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        # Not persistent: it is derived from the config, never loaded from a checkpoint.
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(freqs, device), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        kv: CacheWrite | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T], q [T, H*D], k [T, Hk*D]; rotated in place and returned. With kv
        (Attention.cache_write), the keys and values then go into the cache too."""
        rotary_embedding(positions, q, k, self.head_size, self.cos_sin_cache, self.is_neox, kv)
        return q, k

    def rotate_normed(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        q_norm: RMSNorm,
        k_norm: RMSNorm,
        kv: CacheWrite | None = None,
    ) -> None:
        """RMSNorm every q and k head (Qwen3's q_norm / k_norm, RMSNorm modules of
        head_size), then rotate it: in place, one kernel (which with kv also stores the
        keys and values in the cache)."""
        if not self.is_neox:
            raise ValueError("per-head q/k norms are fused with the neox rotary layout only")
        qk_norm_rotary(
            positions, q, k, self.head_size, self.cos_sin_cache, q_norm.weight, k_norm.weight,
            q_norm.eps, kv,
        )  # fmt: skip
