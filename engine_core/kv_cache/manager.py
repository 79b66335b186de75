"""The KV cache manager: the scheduler's only interface to blocks and the prefix cache.

It keeps one block table per request (the ids of the blocks that hold its KV, in
token order) and nothing about the device tensors. All calls are O(1) or O(blocks
touched); `check_integrity` is the exception and is meant for tests.

Contract with the scheduler:
- A request that holds no blocks (new, or preempted and freed) may pass the result
  of `get_computed_blocks` to its next `allocate_slots`; `num_computed_tokens` must
  not yet include those cache hits.
- `allocate_slots` registers blocks in the prefix cache as soon as the scheduled
  tokens fill them, so a later request of the same step can hit them: each layer
  writes the KV of the whole batch before any attention reads it. `free` drops
  such registrations again for blocks whose tokens were never computed (as told
  by `num_computed_tokens`) when the last reference goes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine_core.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool
from engine_core.kv_cache.prefix_cache import BlockHash, PrefixCache


class KVRequest(Protocol):
    """What the manager reads from a request (read-only)."""

    @property
    def request_id(self) -> str: ...

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt and output tokens so far; grows."""
        ...

    @property
    def num_computed_tokens(self) -> int: ...

    @property
    def num_tokens(self) -> int:
        """len(all_token_ids)."""
        ...

    @property
    def skip_prefix_cache(self) -> bool:
        """True when every prompt token must be computed (prompt logprobs)."""
        ...

    @property
    def cache_salt(self) -> str | None:
        """Shares cached blocks only with requests of the same salt."""
        ...


@dataclass(slots=True)
class _Table:
    """A request's blocks and the hashes of its full blocks."""

    request: KVRequest
    block_ids: list[int] = field(default_factory=list)
    # hashes[i] is the chained hash of block i; only full, known blocks are hashed.
    hashes: list[BlockHash] = field(default_factory=list)
    num_hit_blocks: int = 0  # leading blocks that came from the prefix cache


@dataclass(slots=True)
class _Lookup:
    """The last prefix-cache lookup, so allocate_slots need not hash the hits again."""

    request_id: str
    block_ids: list[int]
    hashes: list[BlockHash]


class KVCacheManager:
    """Block tables, allocation, prefix caching and freeing for the scheduler.

    `num_blocks` counts every block of the KV cache tensors, including the null
    block 0, which is never lent (see block_pool.py).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        hash_algo: str = "builtin",
        max_model_len: int | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.cache = PrefixCache(num_blocks, block_size, hash_algo)
        self.pool = BlockPool(num_blocks, on_evict=self.cache.evict)
        self._tables: dict[str, _Table] = {}
        self._last_lookup: _Lookup | None = None

    # ---- queries -----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated (free, cached or not)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of lendable blocks held by requests, 0..1."""
        usable = self.pool.num_usable_blocks
        return (usable - self.pool.num_free_blocks) / usable

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] if it holds none)."""
        table = self._tables.get(request_id)
        return list(table.block_ids) if table is not None else []

    def num_held_blocks(self, request_id: str) -> int:
        table = self._tables.get(request_id)
        return len(table.block_ids) if table is not None else 0

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens since the last call; resets both.

        A lookup queries all of the request's tokens; hits are the tokens it may skip.
        """
        return self.cache.take_stats()

    # ---- the scheduler's calls ---------------------------------------------------
    def get_computed_blocks(self, request: KVRequest) -> tuple[list[int], int]:
        """The longest cached prefix of the request: (block ids, number of tokens).

        At most num_tokens - 1 tokens are hits, since the last token must be computed
        to get logits; a full hit therefore gives up its last block. Changes nothing
        but the hit counters.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        root = self.cache.salt_root(request.cache_salt)
        block_ids, hashes = self.cache.lookup(request.all_token_ids, max_blocks, root=root)
        self._last_lookup = _Lookup(request.request_id, block_ids, hashes)
        num_hit_tokens = len(block_ids) * self.block_size
        self.cache.record(request.num_tokens, num_hit_tokens)
        return list(block_ids), num_hit_tokens

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        computed_blocks: list[int] | None = None,
        num_computed_from_cache: int = 0,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` tokens after the computed ones.

        The computed ones are `num_computed_tokens` plus the cache hits, if given
        (`computed_blocks` and `num_computed_from_cache` as get_computed_blocks
        returned them; only for a request that holds no blocks). Returns the new
        block ids appended to the request's table (maybe []), or None, changing
        nothing, when too few blocks are free.
        """
        table = self._tables.get(request.request_id)
        if not computed_blocks and table is not None:
            fits = self._fits_held_blocks(request, table, num_new_tokens)
            if fits is not None:
                return fits
        computed_blocks = computed_blocks or []
        self._check_allocate_args(
            request, table, num_new_tokens, computed_blocks, num_computed_from_cache
        )
        hit_hashes = self._hit_hashes(request, computed_blocks) if computed_blocks else []
        num_total = request.num_computed_tokens + num_computed_from_cache + num_new_tokens
        num_held = len(computed_blocks) + (len(table.block_ids) if table is not None else 0)
        num_new_blocks = max(self.num_blocks_needed(num_total) - num_held, 0)
        # Hit blocks that sit in the free list leave it, so they count against it too.
        num_hits_free = sum(1 for b in computed_blocks if self.pool.ref_count(b) == 0)
        if num_new_blocks + num_hits_free > self.pool.num_free_blocks:
            return None
        if table is None:
            table = self._tables[request.request_id] = _Table(request)
        if computed_blocks:
            self._take_hits(table, computed_blocks, hit_hashes)
        new_block_ids = self.pool.allocate(num_new_blocks)
        table.block_ids.extend(new_block_ids)
        if self.enable_prefix_caching:
            self._register_full_blocks(table, min(num_total, request.num_tokens))
        return new_block_ids

    def _fits_held_blocks(
        self, request: KVRequest, table: _Table, num_new_tokens: int
    ) -> list[int] | None:
        """The common decode case, kept cheap: the new tokens fit the blocks already held
        ([]), or None when allocate_slots must take the general path."""
        num_total = request.num_computed_tokens + num_new_tokens
        if num_new_tokens < 0 or num_total > len(table.block_ids) * self.block_size:
            return None
        if self.max_model_len is not None and num_total > self.max_model_len:
            return None  # the general path raises
        if self.enable_prefix_caching:
            self._register_full_blocks(table, min(num_total, request.num_tokens))
        return []

    def free(self, request: KVRequest) -> None:
        """Release the request's blocks (finish, abort or preemption).

        Blocks go to the free list tail first: a request's head blocks are the ones
        most likely shared with others, so they are evicted last.
        """
        table = self._tables.pop(request.request_id, None)
        if table is None:
            return
        freed = self.pool.free(reversed(table.block_ids))
        if freed and self.enable_prefix_caching:
            self._forget_uncomputed(table, set(freed))

    def reset_prefix_cache(self) -> bool:
        """Drop every hash; refused (False) while any block is in use."""
        if self.pool.num_free_blocks != self.pool.num_usable_blocks:
            return False
        self.cache.clear()
        self._last_lookup = None
        return True

    # ---- helpers -----------------------------------------------------------------
    def _check_allocate_args(
        self,
        request: KVRequest,
        table: _Table | None,
        num_new_tokens: int,
        computed_blocks: list[int],
        num_computed_from_cache: int,
    ) -> None:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if num_computed_from_cache != len(computed_blocks) * self.block_size:
            raise ValueError(
                f"{num_computed_from_cache} cached tokens do not fill "
                f"{len(computed_blocks)} blocks of {self.block_size}"
            )
        if computed_blocks and table is not None and table.block_ids:
            raise ValueError(f"request {request.request_id} already holds blocks")
        num_total = request.num_computed_tokens + num_computed_from_cache + num_new_tokens
        if self.max_model_len is not None and num_total > self.max_model_len:
            raise ValueError(f"{num_total} tokens exceed max_model_len {self.max_model_len}")

    def _take_hits(
        self, table: _Table, computed_blocks: list[int], hashes: list[BlockHash]
    ) -> None:
        """Begin an empty table with the cache hits, taking a reference on each."""
        table.hashes = hashes
        self.pool.touch(computed_blocks)
        table.block_ids.extend(computed_blocks)
        table.num_hit_blocks = len(computed_blocks)

    def _hit_hashes(self, request: KVRequest, computed_blocks: list[int]) -> list[BlockHash]:
        """The request's hashes of its hit blocks; raises if a hit went stale."""
        last = self._last_lookup
        num = len(computed_blocks)
        if (
            last is not None
            and last.request_id == request.request_id
            and last.block_ids[:num] == computed_blocks
        ):
            hashes = last.hashes[:num]
        else:
            hashes = self._hash_blocks(request, num)
        for block_id, block_hash in zip(computed_blocks, hashes, strict=True):
            if self.cache.hash_of(block_id) != block_hash:
                raise ValueError(f"block {block_id} no longer caches the request's prefix")
        return hashes

    def _hash_blocks(self, request: KVRequest, num_blocks: int) -> list[BlockHash]:
        """Chained hashes of the request's first `num_blocks` full blocks."""
        token_ids = request.all_token_ids
        hashes: list[BlockHash] = []
        parent = self.cache.salt_root(request.cache_salt)
        for index in range(num_blocks):
            parent = self.cache.hash_block(parent, self.cache.block_tokens(token_ids, index))
            hashes.append(parent)
        return hashes

    def _register_full_blocks(self, table: _Table, num_known_tokens: int) -> None:
        """Hash and cache every block that the known, scheduled tokens fill."""
        num_full = num_known_tokens // self.block_size
        if num_full <= len(table.hashes):
            return
        tokens: Sequence[int] = table.request.all_token_ids
        request_salt = table.request.cache_salt
        for index in range(len(table.hashes), num_full):
            parent = table.hashes[-1] if table.hashes else self.cache.salt_root(request_salt)
            block_hash = self.cache.hash_block(parent, self.cache.block_tokens(tokens, index))
            table.hashes.append(block_hash)
            # False when another block already holds this content: ours stays plain.
            self.cache.insert(table.block_ids[index], block_hash)

    def _forget_uncomputed(self, table: _Table, freed: set[int]) -> None:
        """Unregister freed blocks that were registered but whose tokens never got computed."""
        num_computed = table.request.num_computed_tokens
        first_uncomputed = max(num_computed // self.block_size, table.num_hit_blocks)
        for block_id in table.block_ids[first_uncomputed:]:
            if block_id in freed:
                self.cache.evict(block_id)

    # ---- checks ------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError with a message if any bookkeeping disagrees."""
        self.pool.check_integrity()
        self.cache.check_integrity()
        holders: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            self._check_table(request_id, table)
            holders.update(table.block_ids)
        for block_id in range(self.num_blocks):
            refs = self.pool.ref_count(block_id)
            assert refs == holders[block_id], (
                f"block {block_id} has {refs} references but {holders[block_id]} tables hold it"
            )
            assert (refs == 0) == self.pool.is_free(block_id) or block_id == NULL_BLOCK_ID, (
                f"block {block_id}: {refs} references, free={self.pool.is_free(block_id)}"
            )

    def _check_table(self, request_id: str, table: _Table) -> None:
        request = table.request
        assert request.request_id == request_id, f"table of {request_id} holds another request"
        block_ids = table.block_ids
        for block_id in block_ids:
            assert 0 <= block_id < self.num_blocks, f"{request_id}: block {block_id} out of range"
            assert block_id != NULL_BLOCK_ID, f"{request_id} holds the null block"
        assert len(set(block_ids)) == len(block_ids), f"{request_id} holds a block twice"
        capacity = len(block_ids) * self.block_size
        assert capacity >= request.num_computed_tokens, (
            f"{request_id}: {len(block_ids)} blocks cannot hold "
            f"{request.num_computed_tokens} computed tokens"
        )
        assert len(table.hashes) <= min(len(block_ids), request.num_tokens // self.block_size), (
            f"{request_id}: {len(table.hashes)} hashes for {len(block_ids)} blocks"
        )
        expected = self._hash_blocks(request, len(table.hashes))
        assert table.hashes == expected, f"{request_id}: block hashes disagree with its tokens"
        for block_id, block_hash in zip(block_ids, table.hashes, strict=False):
            cached = self.cache.hash_of(block_id)
            assert cached is None or cached == block_hash, (
                f"{request_id}: block {block_id} is cached under another hash than its tokens'"
            )
