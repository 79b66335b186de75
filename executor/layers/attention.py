"""The attention layer: writes new keys/values into the paged cache, then attends over it.

The layer owns no cache; it reads its cache tensor (by layer index) and the step's
attention metadata from the forward context the model runner enters around a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from executor.forward_context import get_forward_context
from executor.layers.graph_breaks import eager_under_compile
from kernels.attention import paged_attention
from kernels.kv_write import CacheWrite, write_kv

KV_SCALE_HEADROOM = 2.0
CAPPED_QUERY_BLOCK = 1024  # queries per block of the cache-less soft-capped attention
MIN_KV_AMAX = 1e-4  # an all-zero first step must not give a zero scale


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads over a paged KV cache.

    forward(q [T, H*D], k [T, Hk*D], v [T, Hk*D]) -> [T, H*D]. H and Hk are the heads
    this rank holds. sliding_window=0 means full attention; soft_cap=0 means no cap.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int | None = None,
        layer_idx: int = 0,
        sliding_window: int = 0,
        soft_cap: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if num_heads % self.num_kv_heads != 0:
            raise ValueError(f"{num_heads} query heads do not group over {self.num_kv_heads}")
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window or 0
        self.soft_cap = soft_cap or 0.0
        # FP8 cache scales (value stored = value / scale): the checkpoint's, else 1.0;
        # with --calculate-kv-scales taken from the first step that writes the cache.
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.calculate_scales = False

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool = False
    ) -> torch.Tensor:
        """kv_written: the step's keys and values are in the cache already (the rotary
        kernel stored them, through cache_write)."""
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        out = self._attend(q, k, v, kv_written)
        return out.view(-1, self.num_heads * self.head_dim)  # [T, H*D]

    def cache_write(self, v: torch.Tensor) -> CacheWrite | None:
        """This step's cache write for the kernel that makes the keys (the rotary one) to
        do as it finishes them, saving write_kv's launch; v [T, Hk*D]. None where this
        layer must write them itself: no paged cache (a profiling pass), FP8 scales
        still to compute from this step, or under torch.compile (-O), whose traced
        rotary cannot read the step's cache."""
        if torch.compiler.is_compiling() or self.calculate_scales:
            return None
        ctx = get_forward_context()
        if ctx.attn is None:
            return None
        cache = ctx.kv_caches[self.layer_idx]  # [2, N, B, Hk, D]
        values = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        return CacheWrite(
            values, cache[0], cache[1], ctx.attn.slot_mapping, self.k_scale, self.v_scale
        )

    # Under torch.compile (-O) the model is compiled piecewise: attention is the break
    # between pieces. It reads the step's metadata from the forward context, which
    # changes every step; traced, it would recompile every step.
    @eager_under_compile
    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool
    ) -> torch.Tensor:
        if get_forward_context().attn is None:
            return self._attend_one_sequence(q, k, v)
        return self._attend_paged(q, k, v, kv_written)

    def _attend_paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool
    ) -> torch.Tensor:
        ctx = get_forward_context()
        meta = ctx.attn
        assert meta is not None
        cache = ctx.kv_caches[self.layer_idx]  # [2, N, B, Hk, D]
        if not kv_written:
            if self.calculate_scales:
                self._calculate_scales(k, v, cache.dtype)
            write_kv(k, v, cache[0], cache[1], meta.slot_mapping, self.k_scale, self.v_scale)
        out = torch.empty_like(q)  # [T, H, D]
        paged_attention(
            q,
            cache[0],
            cache[1],
            out,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            meta.max_seq_len,
            self.scale,
            self.sliding_window,
            self.soft_cap,
            self.k_scale,
            self.v_scale,
            meta.shared_prefix_len,
        )
        return out

    def _calculate_scales(self, k: torch.Tensor, v: torch.Tensor, cache_dtype: torch.dtype) -> None:
        # Once, on the first step: the scale maps this step's largest magnitude to half
        # the FP8 range, leaving headroom for later tokens (writes saturate beyond it).
        self.calculate_scales = False
        if cache_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return
        half_range = torch.finfo(cache_dtype).max / KV_SCALE_HEADROOM
        self.k_scale = max(float(k.abs().amax()), MIN_KV_AMAX) / half_range
        self.v_scale = max(float(v.abs().amax()), MIN_KV_AMAX) / half_range

    def _attend_one_sequence(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # No cache (a profiling or dummy run): the whole batch is one causal sequence,
        # so a forward can run, and be measured, before any cache exists. The profile
        # sizes the KV cache from this pass's peak memory, so no [H, T, T] score matrix
        # may appear: 4-D inputs let SDPA take its flash or memory-efficient kernels
        # (3-D ones fell back to the math kernel: ~19 GiB at 8,192 tokens of an 8B model,
        # taken from the KV cache), and the soft-capped path goes a block of queries
        # at a time.
        group = self.num_heads // self.num_kv_heads
        qh = q.transpose(0, 1)[None]  # [1, H, T, D]
        kh = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, H, T, D]
        vh = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, H, T, D]
        if self.soft_cap > 0:
            out = self._capped_attention(qh[0], kh[0], vh[0])[None]
        elif self.sliding_window > 0:
            mask = self._causal_mask(q.shape[0], q.device)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        return out[0].transpose(0, 1).contiguous()  # [T, H, D]

    def _causal_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(num_tokens, device=device)
        mask = pos[None, :] <= pos[:, None]  # [T, T], query rows, key columns
        if self.sliding_window > 0:
            mask &= pos[:, None] - pos[None, :] < self.sliding_window
        return mask

    def _capped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = self._causal_mask(q.shape[1], q.device)  # [T, T]
        out = torch.empty_like(q)  # [H, T, D]
        for lo in range(0, q.shape[1], CAPPED_QUERY_BLOCK):
            rows = slice(lo, lo + CAPPED_QUERY_BLOCK)
            scores = torch.matmul(q[:, rows].float(), k.float().transpose(1, 2)) * self.scale
            scores = self.soft_cap * torch.tanh(scores / self.soft_cap)  # [H, rows, T]
            scores = scores.masked_fill(~mask[rows], float("-inf"))
            out[:, rows] = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
        return out
