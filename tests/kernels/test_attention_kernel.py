"""Paged attention: the Triton kernels (interpreted) against the reference in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels.attention
from kernels.attention import (
    _tile_config,
    choose_num_splits,
    choose_prefix_splits,
    paged_attention,
    paged_attention_cascade_triton,
    paged_attention_ref,
    paged_attention_split_kv_triton,
    paged_attention_triton,
)
from tests.kernels.kernel_helpers import (
    TOLERANCE,
    AttentionBatch,
    as_float64,
    assert_close,
    make_attention_batch,
    poisoned,
    rel_err,
)

# Two decodes, a chunked prefill over a cached prefix of 35 tokens, a fresh prefill.
MIXED_Q_LENS = [1, 1, 5, 11]
MIXED_SEQ_LENS = [9, 37, 40, 11]


def reference(
    b: AttentionBatch,
    scale: float,
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    out = poisoned(tuple(b.q.shape), torch.float64)
    paged_attention_ref(
        b.q.double(), as_float64(b.k_cache), as_float64(b.v_cache), out, b.query_start_loc,
        b.seq_lens, b.block_tables, b.max_query_len, b.max_seq_len, scale, sliding_window,
        soft_cap, k_scale, v_scale,
    )  # fmt: skip
    return out


def run_triton(
    b: AttentionBatch,
    scale: float,
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int = 1,
) -> torch.Tensor:
    out = poisoned(tuple(b.q.shape), b.q.dtype)
    args = (
        b.q, b.k_cache, b.v_cache, out, b.query_start_loc, b.seq_lens, b.block_tables,
        b.max_query_len, b.max_seq_len, scale, sliding_window, soft_cap, k_scale, v_scale,
    )  # fmt: skip
    if num_splits > 1:
        paged_attention_split_kv_triton(*args, num_splits=num_splits)
    else:
        paged_attention_triton(*args)
    return out


@pytest.mark.parametrize(
    ("seed", "heads", "kv_heads", "head_dim", "block_size", "dtype"),
    [
        (1, 2, 2, 64, 16, torch.float32),
        (2, 8, 2, 80, 32, torch.bfloat16),
        (3, 4, 1, 80, 16, torch.float32),
        (4, 2, 2, 64, 32, torch.bfloat16),
        (5, 4, 1, 64, 32, torch.float16),
    ],
)
def test_mixed_batch(
    seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(seed)
    b = make_attention_batch(
        MIXED_Q_LENS, MIXED_SEQ_LENS, heads, kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    assert_close(run_triton(b, scale), reference(b, scale), TOLERANCE[dtype])


def test_strided_q_and_long_prefill() -> None:
    # q as a view of a fused qkv output; a prefill longer than one row tile (BLOCK_M).
    torch.manual_seed(6)
    b = make_attention_batch([1, 70], [50, 70], 4, 1, 64, 16, torch.float32, strided_q=True)
    assert not b.q.is_contiguous()
    assert_close(run_triton(b, 0.125), reference(b, 0.125), TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    ("seed", "dtype", "window"), [(7, torch.float32, 8), (8, torch.bfloat16, 70)]
)
def test_sliding_window(seed: int, dtype: torch.dtype, window: int) -> None:
    # Contexts long enough for key steps cut by the window's edge, whole steps inside it,
    # and steps at the diagonal.
    torch.manual_seed(seed)
    b = make_attention_batch([1, 1, 20, 11], [9, 150, 200, 11], 4, 1, 64, 16, dtype)
    ref = reference(b, 0.125, sliding_window=window)
    assert rel_err(reference(b, 0.125), ref) > 0.1  # the window does cut keys here
    assert_close(run_triton(b, 0.125, sliding_window=window), ref, TOLERANCE[dtype])


def test_soft_cap() -> None:
    torch.manual_seed(9)
    b = make_attention_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, 4, 2, 64, 16, torch.float32)
    scale = 0.5  # large logits, so that the cap bites
    ref = reference(b, scale, soft_cap=3.0)
    assert rel_err(reference(b, scale), ref) > 0.1
    assert_close(run_triton(b, scale, soft_cap=3.0), ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    ("seed", "dtype", "cache_dtype"),
    [
        (10, torch.float32, torch.float8_e4m3fn),
        (11, torch.bfloat16, torch.float8_e4m3fn),
        (12, torch.float16, torch.float8_e5m2),
        (17, torch.bfloat16, torch.float8_e5m2),
    ],
)
def test_fp8_cache(seed: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    torch.manual_seed(seed)
    b = make_attention_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, 4, 1, 64, 16, dtype, cache_dtype)
    ref = reference(b, 0.125, k_scale=0.5, v_scale=2.0)
    out = run_triton(b, 0.125, k_scale=0.5, v_scale=2.0)
    assert_close(out, ref, TOLERANCE[dtype])


def test_fp8_cache_bf16_queries_past_float16_range() -> None:
    # bfloat16 queries meet an FP8 cache in float16 products (one conversion of the keys
    # instead of two); queries past float16's range are clamped, never inf or NaN.
    torch.manual_seed(18)
    b = make_attention_batch([1, 3], [40, 9], 4, 1, 64, 16, torch.bfloat16, torch.float8_e4m3fn)
    b.q[0, 0, :4] = torch.tensor([1e6, -1e6, 7e4, -7e4], dtype=torch.bfloat16)
    out = run_triton(b, 1e-6)
    assert torch.isfinite(out).all()
    assert_close(out[1:], reference(b, 1e-6)[1:], TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize(
    ("seed", "kv_heads", "dtype", "num_splits", "sliding_window"),
    [
        (13, 1, torch.float32, 3, 0),
        (14, 4, torch.float32, 8, 0),  # more splits than short contexts fill
        (15, 1, torch.bfloat16, 4, 40),
    ],
)
def test_split_kv_decode(
    seed: int, kv_heads: int, dtype: torch.dtype, num_splits: int, sliding_window: int
) -> None:
    torch.manual_seed(seed)
    # The third sequence has no query this step (length 0): nothing of it is written.
    b = make_attention_batch([1, 1, 0, 1, 1], [70, 130, 20, 5, 64], 4, kv_heads, 64, 16, dtype)
    ref = reference(b, 0.125, sliding_window=sliding_window)
    out = run_triton(b, 0.125, sliding_window=sliding_window, num_splits=num_splits)
    assert_close(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_two_heads_per_kv_head_bf16_decode_tile(num_splits: int) -> None:
    # Qwen3's layout takes its own decode tile (128 keys a step on 4 warps); contexts
    # below, at and across a step's end, and one that is all masked steps.
    assert _tile_config(2, 2, 64, 16, 2)[1:] == (128, 4, 4)
    assert _tile_config(2, 2, 64, 16, 1)[1:] == (64, 2, 3)  # not for FP8 caches
    torch.manual_seed(16)
    seq_lens = [1, 127, 128, 129, 300]
    b = make_attention_batch([1] * 5, seq_lens, 4, 2, 64, 16, torch.bfloat16)
    out = run_triton(b, 0.125, num_splits=num_splits)
    assert_close(out, reference(b, 0.125), TOLERANCE[torch.bfloat16])


def test_split_kv_decode_under_a_graph_bound() -> None:
    # A CUDA graph launches for max_seq_len = --max-seq-len-to-capture, far above the
    # contexts: each sequence's own context is what the splits cut.
    torch.manual_seed(17)
    b = make_attention_batch([1, 1, 1], [700, 1300, 5], 4, 2, 64, 16, torch.float32)
    b = dataclasses.replace(b, max_seq_len=8192)
    assert_close(run_triton(b, 0.125, num_splits=4), reference(b, 0.125), TOLERANCE[torch.float32])


def test_public_function_uses_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(16)
    b = make_attention_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, 4, 1, 64, 16, torch.float32)
    ref = reference(b, 0.125)
    monkeypatch.setenv("TESSERA_KERNELS", "triton")
    out = poisoned(tuple(b.q.shape), torch.float32)
    paged_attention(
        b.q, b.k_cache, b.v_cache, out, b.query_start_loc, b.seq_lens, b.block_tables,
        b.max_query_len, b.max_seq_len, 0.125,
    )  # fmt: skip
    assert_close(out, ref, TOLERANCE[torch.float32])


def test_choose_num_splits() -> None:
    # decode-only, fewer programs than SMs: about two programs per SM, >= 128 keys each
    assert choose_num_splits(1, 8, 1, 4096, 132) == 32
    assert choose_num_splits(4, 8, 1, 4096, 132) == 8
    assert choose_num_splits(4, 8, 1, 1024, 132) == 8  # partitions of 128 keys
    assert choose_num_splits(16, 8, 1, 4096, 132) == 2
    assert choose_num_splits(8, 8, 1, 4096, 132) == 4  # programs <= 2 per SM
    assert choose_num_splits(1, 1, 1, 1 << 20, 132) == 64  # capped
    assert choose_num_splits(17, 8, 1, 8192, 132) == 1  # a wave of programs already
    assert choose_num_splits(1, 8, 2, 8192, 132) == 1  # a prefill in the batch
    assert choose_num_splits(1, 8, 1, 255, 132) == 1  # short contexts


def _bad_args(**changes: object) -> tuple[object, ...]:
    torch.manual_seed(17)
    b = make_attention_batch([1, 3], [5, 3], 4, 2, 64, 16, torch.float32)
    args: dict[str, object] = dict(
        q=b.q, k_cache=b.k_cache, v_cache=b.v_cache, out=torch.empty_like(b.q),
        query_start_loc=b.query_start_loc, seq_lens=b.seq_lens, block_tables=b.block_tables,
        max_query_len=3, max_seq_len=5, scale=0.125,
    )  # fmt: skip
    args.update(changes)
    return tuple(args.values())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"q": torch.zeros(4, 4, 64, dtype=torch.int32)}, "q: dtype"),
        ({"q": torch.randn(4, 3, 64), "out": torch.randn(4, 3, 64)}, "multiple of kv heads"),
        ({"q": torch.randn(4, 4, 80), "out": torch.randn(4, 4, 80)}, "head size of q"),
        ({"q": torch.randn(4, 64, 4).transpose(1, 2)}, "last dimension must be contiguous"),
        ({"out": torch.randn(4, 4, 64, dtype=torch.float64)}, "out: dtype"),
        ({"seq_lens": torch.tensor([5, 3], dtype=torch.float32)}, "seq_lens: dtype"),
        ({"query_start_loc": torch.tensor([0, 1], dtype=torch.int32)}, r"num_seqs \+ 1"),
        (
            {
                "k_cache": torch.randn(5, 16, 2, 64).half(),
                "v_cache": torch.randn(5, 16, 2, 64).half(),
            },
            "k_cache: dtype",
        ),
    ],
)
def test_rejects_bad_arguments(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paged_attention_triton(*_bad_args(**changes))  # type: ignore[arg-type]


def test_split_kv_rejects_prefill() -> None:
    with pytest.raises(ValueError, match="max_query_len == 1"):
        paged_attention_split_kv_triton(*_bad_args(), num_splits=2)  # type: ignore[arg-type]


def _share_prefix(b: AttentionBatch, num_blocks: int) -> AttentionBatch:
    """Every sequence's first num_blocks blocks become sequence 0's (a cached prefix)."""
    tables = b.block_tables.clone()
    tables[:, :num_blocks] = tables[0, :num_blocks]
    return dataclasses.replace(b, block_tables=tables)


def run_cascade(
    b: AttentionBatch,
    prefix_len: int,
    scale: float,
    soft_cap: float = 0.0,
    num_splits: int = 1,
    prefix_splits: int = 1,
) -> torch.Tensor:
    out = poisoned(tuple(b.q.shape), b.q.dtype)
    paged_attention_cascade_triton(
        b.q, b.k_cache, b.v_cache, out, b.query_start_loc, b.seq_lens, b.block_tables,
        b.max_query_len, b.max_seq_len, scale, 0, soft_cap, 1.0, 1.0,
        torch.tensor([prefix_len], dtype=torch.int32),
        num_splits=num_splits, prefix_splits=prefix_splits,
    )  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("seed", "heads", "kv_heads", "dtype", "prefix_len", "num_splits", "prefix_splits"),
    [
        (20, 4, 2, torch.float32, 256, 1, 1),
        (21, 6, 2, torch.float32, 256, 3, 4),  # 3 query heads per KV head: a padded group
        (22, 8, 1, torch.bfloat16, 128, 2, 3),
        (23, 4, 2, torch.float32, 300, 1, 2),  # rounded down to 256; the rest goes per sequence
        (24, 4, 4, torch.float32, 0, 2, 2),  # nothing shared this step
    ],
)
def test_cascade_decode(
    seed: int,
    heads: int,
    kv_heads: int,
    dtype: torch.dtype,
    prefix_len: int,
    num_splits: int,
    prefix_splits: int,
) -> None:
    # Seven decodes whose contexts share 256 keys (16 blocks of 16), then go their own ways;
    # the third sequence has no query this step.
    torch.manual_seed(seed)
    b = make_attention_batch(
        [1, 1, 0, 1, 1, 1, 1, 1], [257, 300, 280, 400, 258, 270, 333, 290], heads, kv_heads,
        64, 16, dtype,
    )  # fmt: skip
    b = _share_prefix(b, 16)
    ref = reference(b, 0.125)
    out = run_cascade(b, prefix_len, 0.125, num_splits=num_splits, prefix_splits=prefix_splits)
    assert_close(out, ref, TOLERANCE[dtype])


def test_cascade_soft_cap_and_more_rows_than_a_tile() -> None:
    # 40 decodes x 4 query heads: the prefix kernel takes them in several row tiles.
    torch.manual_seed(25)
    lens = [130 + 7 * i for i in range(40)]
    b = _share_prefix(make_attention_batch([1] * 40, lens, 8, 2, 64, 16, torch.float32), 8)
    ref = reference(b, 0.5, soft_cap=3.0)
    assert_close(run_cascade(b, 128, 0.5, soft_cap=3.0), ref, TOLERANCE[torch.float32])


def test_cascade_reads_the_prefix_from_row_0() -> None:
    # The hint says the prefix is row 0's blocks: rows whose tables point elsewhere for
    # those keys still get row 0's keys (so the kernel never reads their own table there).
    torch.manual_seed(26)
    b = make_attention_batch([1, 1, 1], [200, 190, 180], 4, 2, 64, 16, torch.float32)
    shared = _share_prefix(b, 8)
    assert rel_err(reference(b, 0.125), reference(shared, 0.125)) > 0.1
    out = run_cascade(b, 128, 0.125)
    assert_close(out, reference(shared, 0.125), TOLERANCE[torch.float32])


def test_choose_prefix_splits() -> None:
    # 256 decodes x 4 query heads per KV head in 128-row tiles, 8 KV heads: 64 programs
    assert choose_prefix_splits(256, 32, 8, 132) == 2
    assert choose_prefix_splits(64, 32, 8, 132) == 8
    assert choose_prefix_splits(8, 32, 8, 132) == 16  # capped
    assert choose_prefix_splits(4096, 32, 8, 132) == 1  # a wave already


def test_public_function_takes_the_cascade(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(27)
    b = _share_prefix(make_attention_batch([1] * 8, [300] * 8, 4, 2, 64, 16, torch.float32), 16)
    ref = reference(b, 0.125)
    calls = []
    cascade = paged_attention_cascade_triton
    monkeypatch.setattr(
        kernels.attention,
        "paged_attention_cascade_triton",
        lambda *a, **kw: calls.append(kw) or cascade(*a, **kw),
    )
    monkeypatch.setenv("TESSERA_KERNELS", "triton")
    out = poisoned(tuple(b.q.shape), torch.float32)
    paged_attention(
        b.q, b.k_cache, b.v_cache, out, b.query_start_loc, b.seq_lens, b.block_tables,
        b.max_query_len, b.max_seq_len, 0.125, shared_prefix_len=torch.tensor([256]),
    )  # fmt: skip
    assert len(calls) == 1
    assert_close(out, ref, TOLERANCE[torch.float32])
