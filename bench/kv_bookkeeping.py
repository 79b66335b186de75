"""Scheduler-side KV bookkeeping per decode step (CPU): 256 requests of 128-token prompts,
256 decode steps, prefix caching on. Run from a checkout (PYTHONPATH) to compare commits:

    PYTHONPATH=. python bench/kv_bookkeeping.py LABEL
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from engine_core.kv_cache.manager import KVCacheManager


@dataclass
class R:
    request_id: str
    all_token_ids: list
    num_computed_tokens: int = 0
    skip_prefix_cache: bool = False
    cache_salt: str | None = None

    @property
    def num_tokens(self):
        return len(self.all_token_ids)


def run():
    m = KVCacheManager(40000, 16, True, "builtin", 4096)
    reqs = [R(str(i), [i * 1000 + t for t in range(128)]) for i in range(256)]
    for r in reqs:
        hits, n = m.get_computed_blocks(r)
        m.allocate_slots(r, r.num_tokens - n, hits, n)
        r.num_computed_tokens = r.num_tokens
    t0 = time.perf_counter()
    for step in range(256):
        for r in reqs:
            r.all_token_ids.append(step)
            m.allocate_slots(r, 1)
            r.num_computed_tokens += 1
    return (time.perf_counter() - t0) / 256 * 1e3


best = min(run() for _ in range(12))
print(f"{sys.argv[1]}: {best:.3f} ms per decode step of 256 requests")
