"""Paged KV cache bookkeeping: block pool, prefix cache and the manager the scheduler calls."""

from engine_core.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool
from engine_core.kv_cache.manager import KVCacheManager, KVRequest
from engine_core.kv_cache.prefix_cache import BlockHash, PrefixCache, get_hash_fn

__all__ = [
    "NULL_BLOCK_ID",
    "BlockHash",
    "BlockPool",
    "KVCacheManager",
    "KVRequest",
    "PrefixCache",
    "get_hash_fn",
]
