"""BlockPool: exact ids, LRU free-list order, reference counts, eviction callbacks."""

import pytest

from engine_core.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool


def make_pool(num_blocks: int = 6) -> tuple[BlockPool, list[int]]:
    """A pool and the list its eviction callback appends to."""
    evicted: list[int] = []
    pool = BlockPool(num_blocks, on_evict=evicted.append)
    return pool, evicted


def test_fresh_pool_lends_all_but_the_null_block() -> None:
    pool, _ = make_pool(6)
    assert NULL_BLOCK_ID == 0
    assert pool.num_usable_blocks == 5
    assert pool.num_free_blocks == 5
    assert pool.free_block_ids() == [1, 2, 3, 4, 5]
    pool.check_integrity()


def test_allocate_hands_out_ids_in_order_and_calls_evict() -> None:
    pool, evicted = make_pool(6)
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(2) == [4, 5]
    assert evicted == [1, 2, 3, 4, 5]
    assert pool.num_free_blocks == 0
    assert [pool.ref_count(b) for b in range(6)] == [0, 1, 1, 1, 1, 1]
    pool.check_integrity()


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool, evicted = make_pool(4)
    with pytest.raises(ValueError, match="asked for 4 blocks, 3 free"):
        pool.allocate(4)
    assert pool.free_block_ids() == [1, 2, 3]
    assert evicted == []


def test_freed_blocks_are_reused_least_recently_freed_first() -> None:
    pool, _ = make_pool(6)
    pool.allocate(3)
    assert pool.free([3, 2, 1]) == [3, 2, 1]
    assert pool.free_block_ids() == [4, 5, 3, 2, 1]
    assert pool.allocate(3) == [4, 5, 3]
    pool.check_integrity()


def test_touch_takes_a_free_block_out_of_the_middle_of_the_free_list() -> None:
    pool, evicted = make_pool(6)
    pool.touch([3])
    assert pool.ref_count(3) == 1
    assert pool.free_block_ids() == [1, 2, 4, 5]
    assert evicted == []  # a touched block keeps its hash
    pool.touch([3])
    assert pool.ref_count(3) == 2
    assert pool.free([3]) == []
    assert pool.free([3]) == [3]
    assert pool.free_block_ids() == [1, 2, 4, 5, 3]
    pool.check_integrity()


def test_double_free_raises() -> None:
    pool, _ = make_pool(4)
    pool.allocate(1)
    pool.free([1])
    with pytest.raises(ValueError, match="block 1 freed more often than taken"):
        pool.free([1])


def test_too_few_blocks_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1)


def test_integrity_check_catches_a_free_block_with_references() -> None:
    pool, _ = make_pool(4)
    pool._ref_counts[2] = 1  # corrupt on purpose: block 2 is still in the free list
    with pytest.raises(AssertionError, match="free block 2 has references"):
        pool.check_integrity()
