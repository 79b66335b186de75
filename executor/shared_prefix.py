"""Cascade attention's host side: how many keys every context of a decode step shares.

With prefix caching, requests that start alike (a system prompt, a few-shot preamble)
hold the same physical blocks for that start. A decode step over many of them would
read those blocks once per sequence; the cascade kernel
(`kernels.attention.paged_attention_cascade_triton`) reads them once per tile of
sequences. It pays only when the prefix is long and the batch wide, so small cases
keep the plain kernel (the thresholds follow what the cascade adds: one more launch,
and a float32 partial per query head and prefix partition written and read back).
"""

from __future__ import annotations

import numpy as np

from kernels.attention import SHARED_PREFIX_ALIGN

CASCADE_MIN_SEQS = 8
CASCADE_MIN_PREFIX = 256  # keys


def shared_prefix_len(tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Keys of the leading blocks that every row of `tables` [S, M] holds alike.

    Only blocks wholly before each sequence's newest key count (that key is written
    this step), rounded down to whole SHARED_PREFIX_ALIGN steps; 0 when the batch or
    the prefix is too small for the cascade to pay.
    """
    if tables.shape[0] < CASCADE_MIN_SEQS:
        return 0
    full_blocks = (int(seq_lens.min()) - 1) // block_size
    if full_blocks * block_size < CASCADE_MIN_PREFIX:
        return 0
    same = (tables[:, :full_blocks] == tables[0, :full_blocks]).all(axis=0)  # [full_blocks]
    blocks = full_blocks if same.all() else int(same.argmin())
    keys = blocks * block_size // SHARED_PREFIX_ALIGN * SHARED_PREFIX_ALIGN
    return keys if keys >= CASCADE_MIN_PREFIX else 0
