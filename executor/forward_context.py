"""Attention metadata for one forward pass, reached by layers through a scoped context.

The model runner builds one `AttentionMetadata` per step and enters
`forward_context(...)` around the model call; each attention layer reads its KV
cache (by layer index) and the metadata from `get_forward_context()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # T = tokens in the step, S = sequences in the step, M = max blocks per sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block_id * block_size + offset) per token
    query_start_loc: torch.Tensor  # [S + 1] int32, token offsets of each sequence in the batch
    seq_lens: torch.Tensor  # [S] int32, context length after this step (computed + new)
    block_tables: torch.Tensor  # [S, M] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, so CPU paths and kernel launch sizing need no device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Decode steps only: the leading keys every context shares, in block_tables row 0's
    # blocks ([1] int32; see executor.shared_prefix). None when nothing is shared.
    shared_prefix_len: torch.Tensor | None = None


@dataclass
class ForwardContext:
    attn: AttentionMetadata | None
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention called outside forward_context()")
    return _current
