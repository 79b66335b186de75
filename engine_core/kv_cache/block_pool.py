"""The pool of KV cache blocks: reference counts and an LRU free list.

Block ids index the KV cache tensors of every worker. Block 0 is the null block:
it is never handed out, and the model runner pads block tables with it, so a
padded slot always points at a block no request writes through its own table.
The pool therefore lends blocks 1 .. num_blocks - 1.

The free list is ordered for eviction: a block freed earlier is reused first
(least recently used). A freed block may still carry a prefix-cache hash; it
stays reusable until it is taken for a new allocation, at which point the pool
calls `on_evict(block_id)` so that the prefix cache drops its hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

NULL_BLOCK_ID = 0


class BlockPool:
    """Reference-counted blocks with an O(1) LRU free list."""

    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        # An OrderedDict used as a doubly linked list: O(1) append, pop-oldest and
        # removal of a cached block from the middle when a request hits it.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can be lent to requests (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, cached or not."""
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def free_block_ids(self) -> list[int]:
        """The free list in eviction order (next to be reused first); for checks and tests."""
        return list(self._free)

    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks from the head of the free list, evicting their hashes.

        Raises ValueError if fewer than `num` blocks are free; callers check first.
        """
        if num > len(self._free):
            raise ValueError(f"asked for {num} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            self._ref_counts[block_id] = 1
            if self._on_evict is not None:
                self._on_evict(block_id)
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (prefix-cache hits).

        A block with no reference leaves the free list, keeping its hash.
        """
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one reference on each block, in the given order.

        Blocks that reach zero go to the tail of the free list in that order, so the
        first of them is evicted first. Returns the blocks that became free.
        """
        freed = []
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} freed more often than taken")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None
                freed.append(block_id)
        return freed

    def check_integrity(self) -> None:
        """Assert the free list and the reference counts agree; see KVCacheManager."""
        assert self._ref_counts[NULL_BLOCK_ID] == 0, "the null block has references"
        assert NULL_BLOCK_ID not in self._free, "the null block is in the free list"
        for block_id in self._free:
            assert 0 < block_id < self.num_blocks, f"free block {block_id} out of range"
            assert self._ref_counts[block_id] == 0, f"free block {block_id} has references"
        num_unreferenced = sum(1 for c in self._ref_counts[1:] if c == 0)
        assert num_unreferenced == len(self._free), (
            f"{num_unreferenced} blocks have no reference but {len(self._free)} are free"
        )
        assert all(c >= 0 for c in self._ref_counts), "negative reference count"
