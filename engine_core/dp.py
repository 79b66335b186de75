"""Data parallelism, the client's side of it: one engine core per rank, one client.

Each data-parallel rank is a whole engine core: its own process, scheduler, KV cache,
workers and devices (rank d uses devices [d * TP * PP, (d + 1) * TP * PP)). The
engine clients (client.py, async_client.py) send each new request to the least-loaded
core, remember which core holds it (aborts go there), merge the cores' outputs and fan
utility calls out to every core. This module holds what both clients share: the
per-rank configs, the routing policy, and the merging of utility results and stats.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine_core.messages import SchedulerStats
from executor.config import EngineConfig

# A waiting request weighs as much as this many running ones: a core with a queue is
# already full (KV cache or --max-num-seqs), so a new request would wait behind it.
WAITING_WEIGHT = 4


def rank_configs(config: EngineConfig) -> list[EngineConfig]:
    """The config of each data-parallel rank's engine core (only the rank differs)."""
    par = config.parallel
    return [
        msgspec.structs.replace(
            config, parallel=msgspec.structs.replace(par, data_parallel_rank=rank)
        )
        for rank in range(par.data_parallel_size)
    ]


class LoadBalancer:
    """Which core gets the next request, and which core holds each request.

    A core's load is the requests this client sent it and has not yet seen finish,
    whether running, waiting or still on their way (in no stats report yet, so that a
    burst spreads at once), plus WAITING_WEIGHT - 1 more for each request that its
    latest stats report as waiting. Ties go round-robin.
    """

    def __init__(self, num_cores: int) -> None:
        self.num_cores = num_cores
        self._core_of: dict[str, int] = {}  # core request id -> its core
        self._unfinished = [0] * num_cores
        self._waiting = [0] * num_cores  # as last reported by each core
        self._last = num_cores - 1  # the core picked last (round-robin among ties)

    def score(self, core: int) -> int:
        unfinished = self._unfinished[core]
        return unfinished + (WAITING_WEIGHT - 1) * min(self._waiting[core], unfinished)

    def pick(self) -> int:
        """The least-loaded core; among equals, the next one after the last picked."""
        order = [(self._last + 1 + i) % self.num_cores for i in range(self.num_cores)]
        best = min(order, key=self.score)  # min keeps the first of equal scores
        self._last = best
        return best

    def assign(self, core: int, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._core_of[request_id] = core
        self._unfinished[core] += len(request_ids)

    def finished(self, request_id: str) -> None:
        """A core reported the request finished (done, stopped, aborted or refused)."""
        core = self._core_of.pop(request_id, None)
        if core is not None:
            self._unfinished[core] -= 1

    def report(self, core: int, stats: SchedulerStats) -> None:
        self._waiting[core] = stats.num_waiting

    def core_of(self, request_id: str) -> int | None:
        return self._core_of.get(request_id)

    def by_core(self, request_ids: list[str]) -> dict[int, list[str]]:
        """The ids grouped by the core that holds them (ids of no core are left out)."""
        groups: dict[int, list[str]] = {}
        for request_id in request_ids:
            core = self._core_of.get(request_id)
            if core is not None:
                groups.setdefault(core, []).append(request_id)
        return groups

    def num_unfinished(self, core: int) -> int:
        return self._unfinished[core]


def as_stats(raw: Any) -> SchedulerStats:
    """A core's get_stats answer (a dict by field name, or the Struct's array form)."""
    if isinstance(raw, SchedulerStats):
        return raw
    if isinstance(raw, dict):
        fields = SchedulerStats.__struct_fields__
        return SchedulerStats(**{k: v for k, v in raw.items() if k in fields})
    return msgspec.convert(raw, SchedulerStats)


def total_stats(per_core: list[SchedulerStats], num_blocks: list[int]) -> SchedulerStats:
    """The stats of all cores as one engine: counts add up; KV cache usage is the used
    fraction of all blocks together."""
    if len(per_core) == 1:
        return per_core[0]
    blocks = sum(num_blocks) or 1
    return SchedulerStats(
        num_running=sum(s.num_running for s in per_core),
        num_waiting=sum(s.num_waiting for s in per_core),
        kv_cache_usage=sum(s.kv_cache_usage * n for s, n in zip(per_core, num_blocks, strict=True))
        / blocks,
        prefix_cache_queries=sum(s.prefix_cache_queries for s in per_core),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in per_core),
        num_preempted=sum(s.num_preempted for s in per_core),
        step_tokens=sum(s.step_tokens for s in per_core),
    )


def combine_results(method: str, results: list[Any], num_blocks: list[int]) -> Any:
    """One answer to a utility call from every core's answer (in rank order)."""
    if len(results) == 1:
        return results[0]
    if method in ("collective_rpc", "profile_stop"):  # each core: a list, per worker
        return [r for core_results in results for r in core_results]
    if method == "reset_prefix_cache":
        return all(results)
    if method == "get_stats":
        stats = total_stats([as_stats(r) for r in results], num_blocks)
        return {name: getattr(stats, name) for name in stats.__struct_fields__}
    if all(r is None for r in results):
        return None
    return results
