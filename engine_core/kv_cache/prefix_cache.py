"""Prefix cache: maps the chained hash of each full block of tokens to the block holding its KV.

The hash of block i of a request covers the tokens of that block and, through its
parent (the hash of block i - 1), every token before it, so equal hashes mean equal
prefixes. Two algorithms, picked by name (`--prefix-caching-hash-algo`):

- "builtin": Python's hash of a tuple; fast, 64 bits, so a collision is possible
  (it would silently reuse the wrong KV).
- "sha256": SHA-256 over a msgpack encoding of (parent digest, token ids, extra
  keys); slower, collisions are out of reach. msgpack (not pickle) keeps the bytes
  stable across Python versions.

Hash values are only compared inside the engine-core process, so the per-process
salt of Python's str hash (for str extra keys under "builtin") does no harm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeAlias

import msgspec

BlockHash: TypeAlias = int | bytes
# Extra inputs that change a block's KV besides its tokens (a LoRA id, a cache salt...).
ExtraKeys: TypeAlias = tuple[int | str, ...]
HashFn: TypeAlias = Callable[[BlockHash | None, Sequence[int], ExtraKeys], BlockHash]

# Parent of a request's first block under "builtin" (an arbitrary fixed constant;
# hash(None) is not stable across processes before Python 3.12).
_BUILTIN_ROOT = 0x7E55E7A

_msgpack_encoder = msgspec.msgpack.Encoder()


def hash_block_builtin(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
) -> BlockHash:
    """Python's hash of (parent, tokens, extra keys)."""
    root = _BUILTIN_ROOT if parent is None else parent
    return hash((root, tuple(token_ids), extra_keys))


def hash_block_sha256(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
) -> BlockHash:
    """SHA-256 digest (32 bytes) of the msgpack encoding of (parent, tokens, extra keys)."""
    root = b"" if parent is None else parent
    payload = _msgpack_encoder.encode((root, list(token_ids), extra_keys))
    return hashlib.sha256(payload).digest()


HASH_FUNCTIONS: dict[str, HashFn] = {
    "builtin": hash_block_builtin,
    "sha256": hash_block_sha256,
}


def get_hash_fn(name: str) -> HashFn:
    """The block hash function for `--prefix-caching-hash-algo`."""
    try:
        return HASH_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown prefix caching hash algorithm {name!r}; choose from {sorted(HASH_FUNCTIONS)}"
        ) from None


class PrefixCache:
    """Two-way map between block hashes and block ids, plus hit counters.

    A block id has at most one hash and a hash at most one block id. When two
    blocks compute the same content, the first one registered wins and the other
    stays unhashed (it is freed as a plain block).
    """

    def __init__(self, num_blocks: int, block_size: int, hash_algo: str = "builtin") -> None:
        self.block_size = block_size
        self.hash_algo = hash_algo
        self._hash_fn = get_hash_fn(hash_algo)
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self.queries = 0  # tokens looked up
        self.hits = 0  # tokens found

    def __len__(self) -> int:
        """The number of cached (hashed) blocks, in use or free."""
        return len(self._block_of)

    def hash_block(
        self, parent: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
    ) -> BlockHash:
        return self._hash_fn(parent, token_ids, extra_keys)

    def salt_root(self, salt: str | None) -> BlockHash | None:
        """The parent of a salted request's first block: requests of another salt (or
        none) never share a block with it, since every hash chains from its first."""
        if salt is None:
            return None
        return self._hash_fn(None, (), ("cache_salt", salt))  # no real block is empty

    def block_tokens(self, token_ids: Sequence[int], index: int) -> Sequence[int]:
        """The tokens of full block `index` of a token sequence."""
        start = index * self.block_size
        return token_ids[start : start + self.block_size]

    def lookup(
        self,
        token_ids: Sequence[int],
        max_blocks: int,
        extra_keys: ExtraKeys = (),
        root: BlockHash | None = None,
    ) -> tuple[list[int], list[BlockHash]]:
        """Cached blocks of the longest prefix of `token_ids`, at most `max_blocks` of them.

        Walks the full blocks from the start and stops at the first miss, so it
        hashes at most one block more than it finds. `root` is the first block's
        parent (a salt's root, see salt_root). Returns (block ids, hashes).
        """
        max_blocks = min(max_blocks, len(token_ids) // self.block_size)
        block_ids: list[int] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = root
        for index in range(max_blocks):
            parent = self._hash_fn(parent, self.block_tokens(token_ids, index), extra_keys)
            block_id = self._block_of.get(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return block_ids, hashes

    def hash_of(self, block_id: int) -> BlockHash | None:
        return self._hash_of[block_id]

    def block_of(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def insert(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full block; False (and no change) if the hash already has a block."""
        if block_hash in self._block_of:
            return False
        if self._hash_of[block_id] is not None:
            raise ValueError(f"block {block_id} already has a hash")
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def evict(self, block_id: int) -> None:
        """Drop the block's hash, if it has one (the block is being reused)."""
        block_hash = self._hash_of[block_id]
        if block_hash is not None:
            self._hash_of[block_id] = None
            del self._block_of[block_hash]

    def clear(self) -> None:
        """Drop every hash."""
        for block_id in self._block_of.values():
            self._hash_of[block_id] = None
        self._block_of.clear()

    def record(self, num_queried: int, num_hit: int) -> None:
        self.queries += num_queried
        self.hits += num_hit

    def take_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens since the last call; resets both."""
        stats = (self.queries, self.hits)
        self.queries = self.hits = 0
        return stats

    def check_integrity(self) -> None:
        """Assert the two directions of the map agree."""
        num_blocks = len(self._hash_of)
        for block_hash, block_id in self._block_of.items():
            assert 0 < block_id < num_blocks, f"cached block {block_id} out of range"
            assert self._hash_of[block_id] == block_hash, (
                f"hash map sends a hash to block {block_id}, which has another hash"
            )
        num_hashed = sum(1 for h in self._hash_of if h is not None)
        assert num_hashed == len(self._block_of), (
            f"{num_hashed} blocks carry a hash but the map holds {len(self._block_of)}"
        )
