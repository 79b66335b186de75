"""Factories and checks shared by the kernel tests (run on the CPU, Triton interpreted)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ||out - ref|| / ||ref|| allowed per output dtype (the reference runs on float64 inputs).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """No NaN anywhere (outputs start poisoned with NaN), relative error under tol."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN (unwritten?) elements"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol:.3g}"


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


@dataclass
class AttentionBatch:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [N, B, Hk, D]
    v_cache: torch.Tensor  # [N, B, Hk, D]
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, M] int32
    max_query_len: int
    max_seq_len: int


def make_attention_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
    strided_q: bool = False,
) -> AttentionBatch:
    """Random q and cache; each sequence's blocks are scattered through the cache in a
    random order, spare table entries and spare blocks hold valid but unrelated ids."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    width = max(blocks_per_seq) + 1
    order = torch.randperm(num_blocks)
    table = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        table[s, :n] = order[used : used + n]
        used += n
    num_tokens = sum(q_lens)
    if strided_q:  # q as a view of a fused [T, H + 2 Hk, D] projection: strided tokens
        qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim).to(dtype)
        q = qkv[:, :num_heads]
    else:
        q = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return AttentionBatch(
        q=q,
        k_cache=torch.randn(cache_shape).to(cache_dtype or dtype),
        v_cache=torch.randn(cache_shape).to(cache_dtype or dtype),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=table,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )


def as_float64(cache: torch.Tensor) -> torch.Tensor:
    # An FP8 cache stays FP8: the reference dequantizes it itself, as the kernel does.
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return cache
    return cache.double()
