"""Paged attention: the Triton kernels (interpreted) against the reference in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.attention import (
    choose_num_splits,
    paged_attention,
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
    ],
)
def test_fp8_cache(seed: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    torch.manual_seed(seed)
    b = make_attention_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, 4, 1, 64, 16, dtype, cache_dtype)
    ref = reference(b, 0.125, k_scale=0.5, v_scale=2.0)
    out = run_triton(b, 0.125, k_scale=0.5, v_scale=2.0)
    assert_close(out, ref, TOLERANCE[dtype])


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
    assert choose_num_splits(4, 8, 1, 4096, 132) == 9
    assert choose_num_splits(4, 8, 1, 1024, 132) == 8  # partitions of 128 keys
    assert choose_num_splits(16, 8, 1, 4096, 132) == 3
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
