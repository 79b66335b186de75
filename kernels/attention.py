"""Paged attention over a mixed batch (prefills, chunked prefills, decodes) in one call.

Sequence s owns query rows query_start_loc[s]:query_start_loc[s+1]; its context is
seq_lens[s] tokens long, stored in the blocks block_tables[s]. Its queries are the
last q_len positions of that context, so query i sits at position
seq_lens[s] - q_len + i and attends causally to keys 0..position (within the sliding
window when one is set). Grouped-query attention: query head h reads kv head
h // (H / Hk).
"""

from __future__ import annotations

import torch


def _dequant(x: torch.Tensor, scale: float) -> torch.Tensor:
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return x.float() * scale
    return x.float()


def _attend(
    q: torch.Tensor,  # [S, Qm, H, D] float32
    k: torch.Tensor,  # [S, L, Hk, D] float32
    v: torch.Tensor,  # [S, L, Hk, D] float32
    q_pos: torch.Tensor,  # [S, Qm] int64 position of each query
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    sliding_window: int,
    soft_cap: float,
) -> torch.Tensor:
    h, hk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("sqhd,skhd->shqk", q, k) * scale  # [S, H, Qm, L]
    if soft_cap > 0:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    k_pos = torch.arange(k.shape[1], device=q.device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < seq_lens[:, None, None]
    )
    if sliding_window > 0:
        mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.einsum("shqk,skhd->sqhd", probs, v)


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int, scale: float):
    # cache [N, B, Hk, D], block_tables [S, M] -> [S, num_blocks * B, Hk, D]
    kv = cache[block_tables[:, :num_blocks].long()]
    s, nb, b, hk, d = kv.shape
    return _dequant(kv.reshape(s, nb * b, hk, d), scale)


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [N, B, Hk, D]
    v_cache: torch.Tensor,  # [N, B, Hk, D]
    out: torch.Tensor,  # [T, H, D], written
    query_start_loc: torch.Tensor,  # [S + 1] int32
    seq_lens: torch.Tensor,  # [S] int32
    block_tables: torch.Tensor,  # [S, M] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int = 0,  # 0 = none
    soft_cap: float = 0.0,  # 0 = none
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    block = k_cache.shape[1]
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    lens = seq_lens.long()
    # Decodes together in one batched pass; longer queries one sequence at a time,
    # so that a long prefill does not pad every decode to its length.
    groups = [torch.nonzero(q_lens == 1).flatten()]
    groups += [i.view(1) for i in torch.nonzero(q_lens > 1).flatten()]
    for idx in groups:
        if idx.numel() == 0:
            continue
        qm = int(q_lens[idx].max())
        lm = int(lens[idx].max())
        nb = (lm + block - 1) // block
        rows = qsl[idx, None] + torch.arange(qm)[None]  # [s, qm]
        valid = torch.arange(qm)[None] < q_lens[idx, None]
        rows = torch.where(valid, rows, qsl[idx, None])
        q_pos = lens[idx, None] - q_lens[idx, None] + torch.arange(qm)[None]
        k = _gather_kv(k_cache, block_tables[idx], nb, k_scale)
        v = _gather_kv(v_cache, block_tables[idx], nb, v_scale)
        o = _attend(q[rows].float(), k, v, q_pos, lens[idx], scale, sliding_window, soft_cap)
        out[rows[valid]] = o[valid].to(out.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    paged_attention_ref(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        max_query_len, max_seq_len, scale, sliding_window, soft_cap, k_scale, v_scale,
    )
