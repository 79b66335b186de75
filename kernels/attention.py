"""Paged attention over a mixed batch (prefills, chunked prefills, decodes) in one call.

Sequence s owns query rows query_start_loc[s]:query_start_loc[s+1]; its context is
seq_lens[s] tokens long, stored in the blocks block_tables[s]. Its queries are the
last q_len positions of that context, so query i sits at position
seq_lens[s] - q_len + i and attends causally to keys 0..position (within the sliding
window when one is set). Grouped-query attention: query head h reads kv head
h // (H / Hk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.dispatch import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    cast_to,
    cdiv,
    check_dim,
    check_dtype,
    check_inner_contiguous,
    check_same_device,
    dot,
    interpreting,
    next_pow2,
    num_sms,
    pdl_launch,
    require,
    tl,
    triton,
    use_triton,
    wait_for_prior_kernel,
)


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
    k_pos = torch.arange(k.shape[1], device=q.device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < seq_lens[:, None, None]
    )  # [S, Qm, L]
    if sliding_window > 0:
        mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
    if soft_cap > 0:
        return _attend_soft_cap(q, k, v, mask, scale, soft_cap)
    return _attend_grouped(q, k, v, mask, scale)


def _attend_grouped(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA with the G query heads of each KV head folded into the query rows.

    Folding avoids materializing the keys G times (repeat_interleave), which made the
    CPU decode path memory-bound on the copies.
    """
    s, qm, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    qg = q.view(s, qm, hk, g, d).permute(0, 2, 1, 3, 4).reshape(s, hk, qm * g, d)
    rows_mask = mask.repeat_interleave(g, dim=1)[:, None]  # [S, 1, Qm * G, L]
    out = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=rows_mask, scale=scale
    )  # [S, Hk, Qm * G, D]
    out = out.view(s, hk, qm, g, d).permute(0, 2, 1, 3, 4).reshape(s, qm, h, d)
    return out.nan_to_num_(0.0)  # rows with no key at all (padding) come out NaN


def _attend_soft_cap(q, k, v, mask, scale: float, soft_cap: float) -> torch.Tensor:
    h, hk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("sqhd,skhd->shqk", q, k) * scale  # [S, H, Qm, L]
    scores = soft_cap * torch.tanh(scores / soft_cap)
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
    shared_prefix_len: torch.Tensor | None = None,  # a hint: the result is the same
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
        rows = qsl[idx, None] + torch.arange(qm, device=q.device)[None]  # [s, qm]
        valid = torch.arange(qm, device=q.device)[None] < q_lens[idx, None]
        rows = torch.where(valid, rows, qsl[idx, None])
        q_pos = lens[idx, None] - q_lens[idx, None] + torch.arange(qm, device=q.device)[None]
        k = _gather_kv(k_cache, block_tables[idx], nb, k_scale)
        v = _gather_kv(v_cache, block_tables[idx], nb, v_scale)
        o = _attend(q[rows].float(), k, v, q_pos, lens[idx], scale, sliding_window, soft_cap)
        out[rows[valid]] = o[valid].to(out.dtype)


# ---- Triton ------------------------------------------------------------------------------
#
# One program owns a tile of BLOCK_M rows for one sequence and one KV head: BLOCK_M // GROUP
# consecutive query tokens times the GROUP query heads that share that KV head (GROUP is
# H / Hk rounded up to a power of two; padding rows are masked). Packing the heads of a
# group into the rows lets one load of a K/V tile serve all of them, which is what makes
# GQA decode cheap, and gives tl.dot at least 16 rows even for a single decode token.
# The program walks the context BLOCK_N keys at a time, looking up each key's physical
# block in the block table, with an online (flash-attention) softmax in base 2. Key steps
# that every row of the tile sees whole (below the diagonal, inside the window) skip the
# mask; only the steps at the diagonal and the window's edge compute it.
#
# A mixed batch takes two launches of the same kernel: one with 16-row tiles for the
# sequences whose queries fit one such tile (decodes), one with 64/128-row tiles for the
# longer ones; each skips the other's sequences. Decodes then never pay for 128-row tiles.

SPLIT_KV_MIN_SEQ_LEN = 256  # below this a decode batch never splits its contexts
SPLIT_KV_MIN_PARTITION = 128  # nor does a split cover fewer keys than this
SPLIT_KV_MAX_SPLITS = 64
# A shared prefix is attended in whole steps of this many keys (every BLOCK_N divides it):
# the rest of it, if any, goes with each sequence's own keys.
SHARED_PREFIX_ALIGN = 128


@triton.jit
def _attend_keys(
    acc,
    l_i,
    m_i,
    q,  # [M, D]
    k_base,
    v_base,
    table,  # this sequence's block-table row
    start_lo,
    start_hi,  # key steps [start_lo, start_hi), multiples of BLOCK_N
    hi,  # keys at or past hi are masked
    pos,  # [M] query positions
    d,
    d_ok,
    qk_scale,
    soft_cap,
    sliding_window,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    for start in range(start_lo, start_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)  # [N]
        if MASKED:
            k_ok = kpos < hi
        else:
            k_ok = kpos >= 0  # every key of the step is in range
        block = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot_in_block = kpos % BLOCK_SIZE
        k_offs = block * stride_kb + slot_in_block * stride_kt  # [N]
        k = tl.load(
            k_base + k_offs[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0
        ).to(q.dtype)  # [D, N]
        s = dot(q, k, PRECISION, INTERPRET) * qk_scale  # [M, N]
        if USE_SOFT_CAP:
            s = soft_cap * (2.0 * tl.sigmoid(2.0 * s / soft_cap) - 1.0)  # cap * tanh(s / cap)
        s = s * 1.4426950408889634  # to base 2
        if MASKED:
            ok = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
            if USE_WINDOW:
                ok = ok & (pos[:, None] - kpos[None, :] < sliding_window)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_offs = block * stride_vb + slot_in_block * stride_vt
        v = tl.load(
            v_base + v_offs[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        ).to(q.dtype)  # [N, D]
        acc = acc * alpha[:, None] + dot(cast_to(p, q.dtype, INTERPRET), v, PRECISION, INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _dot_operand(q, F16_DOT: tl.constexpr):
    # F16_DOT: an FP8 cache under bfloat16 queries. FP8 -> float16 is one conversion
    # (to bfloat16 it goes through float32) and float16 holds every e4m3 and e5m2 value
    # exactly, so the keys and values are multiplied as float16: q is clamped to its range.
    if F16_DOT:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _aligned_prefix(prefix_len_ptr, ALIGN: tl.constexpr):
    # Both launches of a cascade round the shared prefix alike, to whole key steps.
    return (tl.load(prefix_len_ptr) // ALIGN) * ALIGN


@triton.jit
def _store_partial(
    part_acc_ptr, part_m_ptr, part_l_ptr, part, acc, m_i, l_i, d, d_ok, row_ok, HEAD_DIM
):  # fmt: skip
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_l_ptr + part, l_i, mask=row_ok)
    part_offs = part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    tl.store(part_acc_ptr + part_offs, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(
    do_not_specialize=[
        "tiles_per_seq", "min_q_len", "max_q_len", "part_offset", "num_parts", "stride_bt"
    ]
)  # fmt: skip
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,  # split-KV partials [T, H, parts, D] (unused unless SPLIT)
    part_m_ptr,  # [T, H, parts]: running max, base-2 logits
    part_l_ptr,  # [T, H, parts]: softmax denominator
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    prefix_len_ptr,  # [1]: keys below it are another launch's (SKIP_PREFIX only)
    qk_scale,  # softmax scale * k_scale
    soft_cap,
    v_scale,
    sliding_window,
    tiles_per_seq,
    min_q_len,  # this launch skips sequences with fewer queries...
    max_q_len,  # ...or more
    part_offset,  # partials before this launch's: the prefix's (SPLIT: fill from here on)
    num_parts,  # partials per (token, head) (SPLIT only)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    SPLIT: tl.constexpr,
    SKIP_PREFIX: tl.constexpr,
    PREFIX_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr,
    F16_DOT: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    seq = tl.program_id(0) // tiles_per_seq
    # The last tiles of a sequence see the most keys: start them first.
    tile = tiles_per_seq - 1 - tl.program_id(0) % tiles_per_seq
    kv_head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if (tile * BLOCK_Q >= q_len) | (q_len < min_q_len) | (q_len > max_q_len):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len + tile * BLOCK_Q  # position of the tile's first query

    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP  # [M] query index within the sequence
    head = kv_head * QUERIES_PER_KV + rows % GROUP  # [M]
    row_ok = (tok < q_len) & (rows % GROUP < QUERIES_PER_KV)
    pos = seq_len - q_len + tok  # [M]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q_offs = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
    q = _dot_operand(q, F16_DOT)

    # Keys [lo, hi): up to the tile's last query, from the window start of its first.
    # Keys [full_lo, full_hi) are seen by every row: no mask needed there.
    hi = tl.minimum(first_pos + BLOCK_Q, seq_len)
    full_hi = first_pos + 1
    lo = 0
    full_lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - sliding_window + 1, 0)
        full_lo = tl.maximum(hi - sliding_window, 0)
    kv_lo = 0
    if SKIP_PREFIX:  # the shared prefix is _shared_prefix_kernel's
        kv_lo = tl.minimum(_aligned_prefix(prefix_len_ptr, PREFIX_ALIGN), seq_len)
        lo = tl.maximum(lo, kv_lo)
    if SPLIT:
        # This sequence's own context cut evenly, not the launch's bound (a CUDA graph's
        # max_seq_len): short contexts then keep every split busy instead of one.
        split = tl.program_id(2)
        part_len = tl.cdiv(tl.cdiv(seq_len - kv_lo, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = tl.maximum(lo, kv_lo + split * part_len)
        hi = tl.minimum(hi, kv_lo + (split + 1) * part_len)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.minimum(full_hi, hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    # Whole unmasked steps [u_lo, u_hi); masked steps before and after them.
    u_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    u_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, u_lo)

    # A finite floor keeps fully masked rows free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, k_base, v_base, table, lo, tl.minimum(u_lo, hi), hi, pos, d, d_ok,
        qk_scale, soft_cap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt,
        BLOCK_N, BLOCK_SIZE, True, USE_WINDOW, USE_SOFT_CAP, PRECISION, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, k_base, v_base, table, u_lo, u_hi, hi, pos, d, d_ok,
        qk_scale, soft_cap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt,
        BLOCK_N, BLOCK_SIZE, False, USE_WINDOW, USE_SOFT_CAP, PRECISION, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, k_base, v_base, table, u_hi, hi, hi, pos, d, d_ok,
        qk_scale, soft_cap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt,
        BLOCK_N, BLOCK_SIZE, True, USE_WINDOW, USE_SOFT_CAP, PRECISION, INTERPRET,
    )  # fmt: skip

    if SPLIT:
        num_heads = tl.num_programs(1) * QUERIES_PER_KV
        part = ((q_start + tok) * num_heads + head) * num_parts + part_offset + tl.program_id(2)
        _store_partial(
            part_acc_ptr, part_m_ptr, part_l_ptr, part, acc * v_scale, m_i, l_i, d, d_ok,
            row_ok, HEAD_DIM,
        )  # fmt: skip
    else:
        acc = acc * v_scale
        if SKIP_PREFIX:  # and no split: fold in the prefix's partials (slots 0..part_offset)
            num_heads = tl.num_programs(1) * QUERIES_PER_KV
            first = ((q_start + tok) * num_heads + head) * num_parts  # [M]
            for part in range(0, part_offset):
                m_p = tl.load(part_m_ptr + first + part, mask=row_ok, other=-1.0e30)
                l_p = tl.load(part_l_ptr + first + part, mask=row_ok, other=0.0)
                acc_offs = (first + part).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
                acc_p = tl.load(
                    part_acc_ptr + acc_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0
                )
                m_new = tl.maximum(m_i, m_p)
                alpha = tl.exp2(m_i - m_new)
                beta = tl.exp2(m_p - m_new)
                acc = acc * alpha[:, None] + acc_p * beta[:, None]
                l_i = l_i * alpha + l_p * beta
                m_i = m_new
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_offs = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        o = cast_to(o, out_ptr.dtype.element_ty, INTERPRET)
        tl.store(out_ptr + o_offs, o, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens", "num_parts"])
def _shared_prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_acc_ptr,  # [T, H, parts, D]: this launch fills parts 0 .. splits - 1
    part_m_ptr,
    part_l_ptr,
    block_tables_ptr,  # row 0 holds the shared blocks
    prefix_len_ptr,  # [1]
    qk_scale,
    soft_cap,
    v_scale,
    num_tokens,
    num_parts,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    PREFIX_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr,
    F16_DOT: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # Cascade attention, first half: the decode queries of every sequence against the
    # keys all of them share, read once per tile of BLOCK_M // GROUP sequences instead of
    # once per sequence. Each query sits past the prefix, so no key is masked. Rows pack
    # consecutive decode tokens times the GROUP query heads of one KV head.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP  # [M] decode token = sequence
    kv_head = tl.program_id(1)
    head = kv_head * QUERIES_PER_KV + rows % GROUP  # [M]
    row_ok = (tok < num_tokens) & (rows % GROUP < QUERIES_PER_KV)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_offs = tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
    q = _dot_operand(q, F16_DOT)

    prefix = _aligned_prefix(prefix_len_ptr, PREFIX_ALIGN)
    part_len = tl.cdiv(tl.cdiv(prefix, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = tl.program_id(2) * part_len
    hi = tl.minimum(prefix, lo + part_len)  # lo and hi are whole key steps

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, k_cache_ptr + kv_head * stride_kh, v_cache_ptr + kv_head * stride_vh,
        block_tables_ptr, lo, hi, hi, tok, d, d_ok, qk_scale, soft_cap, 0,
        stride_kb, stride_kt, stride_vb, stride_vt,
        BLOCK_N, BLOCK_SIZE, False, False, USE_SOFT_CAP, PRECISION, INTERPRET,
    )  # fmt: skip
    num_heads = tl.num_programs(1) * QUERIES_PER_KV
    part = (tok * num_heads + head) * num_parts + tl.program_id(2)
    _store_partial(
        part_acc_ptr, part_m_ptr, part_l_ptr, part, acc * v_scale, m_i, l_i, d, d_ok, row_ok,
        HEAD_DIM,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_splits"])
def _split_kv_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    query_start_loc_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # Merge the partitions of one (decode token, head): rescale each partial sum by
    # 2^(m_s - max m) and divide by the equally rescaled denominators.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = (q_start * tl.num_programs(1) + head) * num_splits
    m = tl.load(part_m_ptr + row + splits, mask=s_ok, other=-1.0e30)  # [S]
    l_s = tl.load(part_l_ptr + row + splits, mask=s_ok, other=0.0)  # [S]
    w = tl.exp2(m - tl.max(m, 0))  # [S]
    denom = tl.sum(w * l_s, 0)
    acc_offs = (row + splits).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    acc = tl.load(part_acc_ptr + acc_offs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)  # [D]
    o = cast_to(o, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + q_start * stride_ot + head * stride_oh + d, o, mask=d_ok)


def _check_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    check_dim("q", q, (3,))
    check_dim("k_cache", k_cache, (4,))
    require(
        v_cache.shape == k_cache.shape,
        lambda: f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}",
    )
    require(out.shape == q.shape, lambda: f"out {tuple(out.shape)} != q {tuple(q.shape)}")
    h, d = q.shape[1:]
    hk, dk = k_cache.shape[2:]
    require(dk == d, lambda: f"head size of q ({d}) and of the cache ({dk}) differ")
    require(16 <= d <= 256, lambda: f"head size {d} not supported (16..256)")
    require(hk > 0 and h % hk == 0, lambda: f"query heads ({h}) not a multiple of kv heads ({hk})")
    check_dtype("q", q, FLOAT_DTYPES)
    check_dtype("out", out, FLOAT_DTYPES)
    check_dtype("k_cache", k_cache, (q.dtype, *FP8_DTYPES))
    require(
        v_cache.dtype == k_cache.dtype,
        lambda: f"v_cache {v_cache.dtype} != k_cache {k_cache.dtype}",
    )
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        check_dim(name, t, (1,))
        check_dtype(name, t, (torch.int32, torch.int64))
        require(t.is_contiguous(), name + " must be contiguous")
    check_dim("block_tables", block_tables, (2,))
    check_dtype("block_tables", block_tables, (torch.int32, torch.int64))
    num_seqs = seq_lens.shape[0]
    require(
        query_start_loc.shape[0] == num_seqs + 1, "query_start_loc must have num_seqs + 1 entries"
    )
    require(block_tables.shape[0] >= num_seqs, "block_tables has fewer rows than seq_lens")
    for name, t in (("q", q), ("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_inner_contiguous(name, t)
    check_inner_contiguous("block_tables", block_tables)
    check_same_device(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        out=out,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
    )


def _tile_config(
    rows: int, group: int, block_d: int, block_size: int, cache_bytes: int = 2
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for tiles of `rows` live rows at most.

    Picked from H100 timings (bench/kernels_gpu.py). Decode tiles: 16 rows (tl.dot's
    least), 64 keys a step, 2 warps and 3 stages, which keeps more loads in flight per
    byte (FP8 caches gain most: 354 -> 253 us at 64 x 4096 tokens); with two query heads
    a KV head on a 16-bit cache, 128 keys a step on 4 warps, 4 stages. Longer queries:
    64 x 32 tiles on 4 warps, 2 stages (bench/attn_tune.py --prefill on an H200: W2's
    16K-token prompt step 299.5 -> 219.2 us a layer, W1's 648.1 -> 497.5, against the
    128 x 128 tiles on 8 warps before), 64-row tiles for shorter queries and for head
    sizes over 128, whose accumulator would not fit 128 rows in registers. A step never
    reads part of a cache block when blocks are up to 128 long.
    """
    small_d = block_d <= 128
    if rows <= 16 and group == 2 and small_d and cache_bytes == 2:
        # two query heads a KV head (Qwen3): longer key steps on more warps won at 256
        # decodes of 200-2048 keys (429.5 against 449.8 us, bench/attn_tune.py)
        block_m, block_n, num_warps, num_stages = 16, 128, 4, 4
    elif rows <= 16:
        block_m, block_n, num_warps, num_stages = 16, 64 if small_d else 32, 2, 3
    elif rows <= 64 or not small_d:
        block_m, block_n, num_warps, num_stages = 64, 64 if small_d else 32, 4, 3 if small_d else 2
    else:
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 2
    if block_m < group:  # one token's query heads must fit a tile
        block_m, num_warps = group, 4
    if block_size & (block_size - 1) == 0:
        block_n = max(block_n, min(block_size, 128 if small_d else 64))
    return block_m, block_n, num_warps, num_stages


def query_launches(max_query_len: int, group: int) -> list[tuple[int, int, int]]:
    """(min, max) query length of the sequences each launch of a batch takes, and the
    rows of its tiles: one launch when every query fits a decode-sized tile, else one
    for the short queries and one sized by the longest."""
    short_q = max(16, group) // group  # queries that fit one decode-sized tile
    if max_query_len <= short_q:
        return [(0, max_query_len, max_query_len * group)]
    return [(0, short_q, short_q * group), (short_q + 1, max_query_len, max_query_len * group)]


def tile_query_lens(num_heads: int, num_kv_heads: int) -> list[int]:
    """Query lengths whose batches, one sequence each, launch every tile of _tile_config.

    A batch takes the decode-sized tile for its queries of up to `short_q` tokens and
    one sized by its longest query for the rest; these lengths reach each size (the
    warm-up of executor.warmup compiles them all before the first request).
    """
    group = next_pow2(num_heads // num_kv_heads)
    short_q = max(16, group) // group
    medium = max(1, 64 // group)  # the longest query of a tile of at most 64 rows
    return sorted({short_q, medium, medium + 1})


def _launch(
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
    sliding_window: int,
    soft_cap: float,
    k_scale: float,
    v_scale: float,
    num_splits: int,
    prefix_len: torch.Tensor | None = None,
    prefix_splits: int = 0,
) -> None:
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    if q.shape[0] == 0 or num_seqs == 0 or max_query_len <= 0:
        return
    group = next_pow2(num_heads // num_kv_heads)
    block_d = max(16, next_pow2(head_dim))
    partials = _split_partials(
        q, max_seq_len, num_splits, group, block_d, block_size, prefix_splits,
        k_cache.element_size(),
    )  # fmt: skip
    if prefix_splits:
        assert prefix_len is not None
        _launch_shared_prefix(
            q, k_cache, v_cache, block_tables, prefix_len, partials, scale * k_scale, soft_cap,
            v_scale, group, block_d, prefix_splits,
        )  # fmt: skip
    for min_q, max_q, rows in query_launches(max_query_len, group):
        block_m, block_n, num_warps, num_stages = _tile_config(
            rows, group, block_d, block_size, k_cache.element_size()
        )
        tiles_per_seq = cdiv(max_q, block_m // group)
        grid = (num_seqs * tiles_per_seq, num_kv_heads, partials.num_splits)
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, out, partials.acc, partials.m, partials.l,
            query_start_loc, seq_lens, block_tables,
            prefix_len if prefix_len is not None else seq_lens,
            scale * k_scale, soft_cap, v_scale, sliding_window, tiles_per_seq,
            min_q, max_q, prefix_splits, partials.num_parts,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            QUERIES_PER_KV=num_heads // num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
            USE_WINDOW=sliding_window > 0, USE_SOFT_CAP=soft_cap > 0,
            SPLIT=partials.num_splits > 1, SKIP_PREFIX=prefix_splits > 0,
            PREFIX_ALIGN=SHARED_PREFIX_ALIGN,
            PRECISION=_precision(q), F16_DOT=_f16_dot(q, k_cache), INTERPRET=interpreting(), **pdl_launch(q),
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    if partials.num_splits > 1:
        _split_kv_reduce_kernel[(num_seqs, num_heads)](
            out, partials.acc, partials.m, partials.l, query_start_loc, partials.num_parts,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(partials.num_parts),
            INTERPRET=interpreting(), **pdl_launch(out), num_warps=4,
        )  # fmt: skip


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _f16_dot(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and k_cache.element_size() == 1


def _launch_shared_prefix(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_len: torch.Tensor,
    partials: _SplitPartials,
    qk_scale: float,
    soft_cap: float,
    v_scale: float,
    group: int,
    block_d: int,
    prefix_splits: int,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1:3]
    block_m, block_n, num_warps, num_stages = _prefix_tile_config(
        num_tokens, group, block_d, block_size
    )
    grid = (cdiv(num_tokens * group, block_m), num_kv_heads, prefix_splits)
    _shared_prefix_kernel[grid](
        q, k_cache, v_cache, partials.acc, partials.m, partials.l, block_tables, prefix_len,
        qk_scale, soft_cap, v_scale, num_tokens, partials.num_parts,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        QUERIES_PER_KV=num_heads // num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        USE_SOFT_CAP=soft_cap > 0, PREFIX_ALIGN=SHARED_PREFIX_ALIGN,
        PRECISION=_precision(q), F16_DOT=_f16_dot(q, k_cache), INTERPRET=interpreting(), **pdl_launch(q),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def _prefix_tile_config(
    num_tokens: int, group: int, block_d: int, block_size: int
) -> tuple[int, int, int, int]:
    """The shared-prefix kernel's tiles: every decode query of a KV head is a row. Many
    rows keep the 128 x 128 tiles on 8 warps that the paged kernel's long queries had
    before their 64 x 32 (timed for prompts, not for this kernel's decode rows)."""
    rows = max(num_tokens * group, 17)
    if rows > 64 and block_d <= 128:
        return 128, 128, 8, 3
    return _tile_config(rows, group, block_d, block_size)


@dataclass
class _SplitPartials:
    """Split-KV buffers: each partition's unnormalized output, running max and sum.

    A cascade's shared-prefix splits come first, then the num_splits of each sequence's
    own keys when those are more than one (one split merges the prefix's itself).
    """

    num_parts: int
    num_splits: int
    acc: torch.Tensor  # [T, H, parts, D] float32
    m: torch.Tensor  # [T, H, parts] float32
    l: torch.Tensor  # noqa: E741  [T, H, parts] float32


def _split_partials(
    q: torch.Tensor,
    max_seq_len: int,
    num_splits: int,
    group: int,
    block_d: int,
    block_size: int,
    prefix_splits: int = 0,
    cache_bytes: int = 2,
) -> _SplitPartials:
    if num_splits <= 1 and not prefix_splits:
        return _SplitPartials(1, 1, q, q, q)  # placeholders, never touched
    if num_splits > 1:
        _, block_n, _, _ = _tile_config(group, group, block_d, block_size, cache_bytes)
        # Whole BLOCK_N steps per partition of the longest context; rounding up may leave
        # fewer partitions. (The kernel cuts each sequence's own context into as many.)
        partition_size = cdiv(cdiv(max_seq_len, num_splits), block_n) * block_n
        num_splits = cdiv(max_seq_len, partition_size)
    num_splits = max(1, num_splits)
    # one split of a sequence's own keys merges the prefix's partials itself
    num_parts = prefix_splits + (num_splits if num_splits > 1 else 0)
    t, h, d = q.shape
    acc = torch.empty((t, h, num_parts, d), dtype=torch.float32, device=q.device)
    m = torch.empty((t, h, num_parts), dtype=torch.float32, device=q.device)
    return _SplitPartials(num_parts, num_splits, acc, m, torch.empty_like(m))


def paged_attention_triton(
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
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton `paged_attention_ref` over the whole batch, with no host sync.

    One launch for a batch whose queries all fit a 16-row tile (decodes); a mixed batch
    takes two launches of the same kernel, decode-sized tiles for its short queries and
    64/128-row tiles for its long ones. max_query_len sizes the grid and must be at least
    every sequence's query length (not checked on the device). Raises ValueError on bad
    shapes, strides or dtypes.
    """
    _check_attention_args(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables)
    _launch(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, max_query_len,
        max_seq_len, scale, sliding_window, soft_cap, k_scale, v_scale, num_splits=1,
    )  # fmt: skip


def paged_attention_split_kv_triton(
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
    *,
    num_splits: int = 8,
) -> None:
    """Split-KV (flash-decoding) `paged_attention_ref` for decode-only batches.

    Each (sequence, KV head) context is cut into up to `num_splits` partitions of whole
    BLOCK_N steps, attended in parallel; a second kernel merges the partial softmaxes.
    Every query length must be 0 or 1 (max_query_len == 1), and max_seq_len must be at
    least every seq_lens entry: keys past num_splits partitions of it are never read.
    Under CUDA graphs pass the longest context a replay may see.
    """
    _check_attention_args(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables)
    require(
        max_query_len == 1,
        lambda: f"split-KV attention needs max_query_len == 1, got {max_query_len}",
    )
    require(num_splits >= 1, lambda: f"num_splits must be >= 1, got {num_splits}")
    _launch(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, max_query_len,
        max_seq_len, scale, sliding_window, soft_cap, k_scale, v_scale, num_splits=num_splits,
    )  # fmt: skip


def paged_attention_cascade_triton(
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
    shared_prefix_len: torch.Tensor | None = None,
    *,
    num_splits: int = 1,
    prefix_splits: int = 1,
) -> None:
    """Cascade `paged_attention_ref` for decode-only batches whose contexts share a prefix.

    shared_prefix_len ([1] int32 on the device, so that a CUDA graph serves any value)
    says that the first keys of every sequence sit in the same blocks, those of
    block_tables row 0; it is rounded down to a multiple of SHARED_PREFIX_ALIGN and must
    be below every seq_lens entry (not checked on the device). One kernel attends every
    query to those keys in `prefix_splits` partitions, read once per tile of sequences;
    the paged kernel attends each sequence's own keys and folds the prefix's partials in
    itself, or, with `num_splits` > 1, leaves its own partials to the merge kernel.
    No sliding window: its keys differ per sequence.
    """
    _check_attention_args(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables)
    require(
        max_query_len == 1,
        lambda: f"cascade attention needs max_query_len == 1, got {max_query_len}",
    )
    require(sliding_window == 0, "cascade attention takes no sliding window")
    require(
        shared_prefix_len is not None
        and shared_prefix_len.shape == (1,)
        and shared_prefix_len.dtype in (torch.int32, torch.int64)
        and shared_prefix_len.device == q.device,
        "shared_prefix_len must be a [1] int32/int64 tensor on q's device",
    )
    require(num_splits >= 1 and prefix_splits >= 1, "num_splits and prefix_splits must be >= 1")
    _launch(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, max_query_len,
        max_seq_len, scale, sliding_window, soft_cap, k_scale, v_scale, num_splits=num_splits,
        prefix_len=shared_prefix_len, prefix_splits=prefix_splits,
    )  # fmt: skip


def choose_prefix_splits(num_tokens: int, num_heads: int, num_kv_heads: int, sms: int) -> int:
    """Partitions of a shared prefix: about one wave of programs, at most 16.

    The prefix kernel has one program per (tile of decode rows, KV head), few at any
    batch (8 tiles x 8 KV heads for 256 decodes of an 8B model), so it splits the keys;
    each partition adds a float32 partial per query head that the paged kernel reads
    back, so no more than fill the GPU once. H100, 8B shape, 896 shared keys
    (bench/kernels_gpu.py): 256 decodes 118 us with 2 partitions against 129 with 4 and
    151 with 8; 64 decodes 47-48 us with 4-8 against 61 with 1.
    """
    group = next_pow2(num_heads // num_kv_heads)
    block_m = _prefix_tile_config(num_tokens, group, 128, 16)[0]
    programs = cdiv(num_tokens * group, block_m) * num_kv_heads
    return max(1, min(sms // programs, 16))


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, sms: int
) -> int:
    """How many partitions `paged_attention` gives each context (1 = no split-KV).

    The one-pass kernel runs one program per (sequence, KV head) for a decode batch; when
    those are fewer than the multiprocessors, most of the GPU idles while each program
    walks its context alone. Then, and only for decode-only batches (max_query_len == 1)
    with contexts of at least SPLIT_KV_MIN_SEQ_LEN keys, the contexts are cut into as many
    partitions as keep the programs at or under two per multiprocessor, each at least
    SPLIT_KV_MIN_PARTITION keys long, at most SPLIT_KV_MAX_SPLITS of them. On an H100
    (132 SMs, 8 KV heads) this gives 32 splits at batch 1 and 4K context, 16 at batch 2,
    8 at batch 4, 4 at batch 8, 2 at batch 16 and none from batch 17 on. In
    bench/split_tune.py (W1's, W2's and 4K contexts) that was the fastest count at
    batches 8 and 16, within 1.2 us of it at 2 and 4, and at most 7% off from 17 on; at
    batch 1 every count from 12 up took 9-14 us. Rounding up (3 splits at batch 16)
    cost 1-13% against 2.
    """
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or max_seq_len < SPLIT_KV_MIN_SEQ_LEN or programs >= sms:
        return 1
    wanted = 2 * sms // max(1, programs)
    return max(1, min(wanted, max_seq_len // SPLIT_KV_MIN_PARTITION, SPLIT_KV_MAX_SPLITS))


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
    shared_prefix_len: torch.Tensor | None = None,
) -> None:
    """Attention of every query in the batch over its paged context, written into out.

    On CUDA (see kernels.dispatch) the Triton kernels run: cascade attention when the
    caller names a shared prefix (decode-only batches, no sliding window), split-KV when
    `choose_num_splits` says so (long decode-only batches), else the one-pass kernel.
    Elsewhere `paged_attention_ref` runs.
    """
    args = (
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        max_query_len, max_seq_len, scale, sliding_window, soft_cap, k_scale, v_scale,
    )  # fmt: skip
    if not use_triton(q):
        paged_attention_ref(*args, shared_prefix_len)
        return
    sms = num_sms(q.device.index if q.device.index is not None else 0) if q.is_cuda else 1
    splits = choose_num_splits(seq_lens.shape[0], k_cache.shape[2], max_query_len, max_seq_len, sms)
    if shared_prefix_len is not None and max_query_len == 1 and sliding_window == 0:
        prefix_splits = choose_prefix_splits(q.shape[0], q.shape[1], k_cache.shape[2], sms)
        paged_attention_cascade_triton(
            *args, shared_prefix_len, num_splits=splits, prefix_splits=prefix_splits
        )
    elif splits > 1:
        paged_attention_split_kv_triton(*args, num_splits=splits)
    else:
        paged_attention_triton(*args)
