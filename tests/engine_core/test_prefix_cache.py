"""Prefix cache: chained block hashes, lookup up to the first miss, the two-way map, counters."""

import pytest

from engine_core.kv_cache.prefix_cache import (
    PrefixCache,
    get_hash_fn,
    hash_block_builtin,
    hash_block_sha256,
)

BLOCK_SIZE = 2


def make_cache(hash_algo: str = "builtin", num_blocks: int = 8) -> PrefixCache:
    return PrefixCache(num_blocks, BLOCK_SIZE, hash_algo)


def chain(cache: PrefixCache, token_ids: list[int]) -> list[int | bytes]:
    """Chained hashes of every full block of `token_ids`."""
    hashes: list[int | bytes] = []
    parent = None
    for index in range(len(token_ids) // BLOCK_SIZE):
        parent = cache.hash_block(parent, cache.block_tokens(token_ids, index))
        hashes.append(parent)
    return hashes


def test_sha256_digest_is_pinned() -> None:
    # The encoding must not drift between versions: this value is msgpack of
    # (b"", [1, 2, 3, 4], ()) through SHA-256.
    digest = hash_block_sha256(None, [1, 2, 3, 4])
    assert isinstance(digest, bytes)
    assert digest.hex() == "31a04e67cff595197b1a444b328a8e34de79991d22ab5d985bb3c4c3e9565016"


@pytest.mark.parametrize("hash_fn", [hash_block_builtin, hash_block_sha256])
def test_hash_depends_on_parent_tokens_and_extra_keys(hash_fn) -> None:
    root = hash_fn(None, [1, 2])
    assert hash_fn(None, [1, 2]) == root
    assert hash_fn(None, (1, 2)) == root  # tuples and lists hash alike
    assert hash_fn(None, [2, 1]) != root
    assert hash_fn(root, [1, 2]) != root
    assert hash_fn(None, [1, 2], (7,)) != root
    assert hash_fn(None, [1, 2], ("lora-a",)) != hash_fn(None, [1, 2], ("lora-b",))


def test_get_hash_fn_by_name() -> None:
    assert get_hash_fn("builtin") is hash_block_builtin
    assert get_hash_fn("sha256") is hash_block_sha256
    with pytest.raises(ValueError, match="unknown prefix caching hash algorithm 'md5'"):
        get_hash_fn("md5")


@pytest.mark.parametrize("hash_algo", ["builtin", "sha256"])
def test_lookup_stops_at_the_first_miss(hash_algo: str) -> None:
    cache = make_cache(hash_algo)
    tokens = [5, 6, 7, 8, 9, 10, 11]
    h0, h1, h2 = chain(cache, tokens)
    assert cache.insert(3, h0)
    assert cache.insert(4, h2)  # block 1 missing: block 2 is unreachable
    assert cache.lookup(tokens, max_blocks=10) == ([3], [h0])
    assert cache.insert(6, h1)
    assert cache.lookup(tokens, max_blocks=10) == ([3, 6, 4], [h0, h1, h2])
    assert cache.lookup(tokens, max_blocks=2) == ([3, 6], [h0, h1])
    assert cache.lookup([5, 6, 0, 0], max_blocks=10) == ([3], [h0])
    assert cache.lookup([9, 9, 7, 8], max_blocks=10) == ([], [])  # same block, other parent
    cache.check_integrity()


def test_insert_is_first_wins_and_evict_clear_keep_both_directions() -> None:
    cache = make_cache()
    (h0,) = chain(cache, [1, 2])
    assert cache.insert(2, h0)
    assert not cache.insert(5, h0)
    assert cache.hash_of(5) is None
    assert cache.block_of(h0) == 2
    assert len(cache) == 1
    with pytest.raises(ValueError, match="block 2 already has a hash"):
        cache.insert(2, hash_block_builtin(None, [3, 4]))
    cache.evict(5)  # no hash: nothing happens
    cache.evict(2)
    assert cache.block_of(h0) is None
    assert cache.hash_of(2) is None
    assert len(cache) == 0
    cache.insert(1, h0)
    cache.clear()
    assert (len(cache), cache.hash_of(1)) == (0, None)
    cache.check_integrity()


def test_stats_accumulate_and_reset() -> None:
    cache = make_cache()
    cache.record(10, 4)
    cache.record(6, 0)
    assert cache.take_stats() == (16, 4)
    assert cache.take_stats() == (0, 0)


def test_integrity_check_catches_a_one_way_entry() -> None:
    cache = make_cache()
    cache._block_of[123] = 3  # corrupt on purpose: block 3 does not know this hash
    with pytest.raises(AssertionError, match="hash map sends a hash to block 3"):
        cache.check_integrity()
