"""Prometheus metrics of the server, with vLLM's metric names under a `tessera:` prefix.

Every app has its own CollectorRegistry (two servers in one process never mix counts).
The engine-step figures come twice: as totals over every engine core under the usual
names, and per core (data-parallel rank) under `tessera:per_engine_*`, labelled
`engine="0"`, `engine="1"`, ... Three sources feed it:

- the engine's step stats (`SchedulerStats`, on every EngineCoreOutputs, through the
  client's `stats_listeners`, and fresh from the core at each scrape): running and
  waiting requests, KV cache usage, prefix cache queries and hits, preemptions;
- the same listener, for token timing of every sequence that a route handler registered
  (`track`): generation tokens, TTFT, inter-token latency, and queue time (from arrival
  to the start of the engine step that first ran the sequence);
- the route handler, when a request ends (`RequestTracker.finish`): the finish reason,
  end-to-end latency and time per output token of each sequence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    exposition,
    generate_latest,
)

from engine_core.dp import as_stats, total_stats
from engine_core.messages import EngineCoreOutputs, SchedulerStats
from engine_core.processor import child_request_ids

logger = logging.getLogger("api_server.metrics")

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST
PREFIX = "tessera:"

# Bucket bounds (seconds), as vLLM's.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# A scrape asks the core for fresh stats; it waits at most this long for the answer.
STATS_CALL_TIMEOUT_S = 0.5


class ServerMetrics:
    """The server's metrics; `render()` gives the Prometheus text of its registry."""

    def __init__(self, model_name: str, engine_blocks: list[int] | None = None) -> None:
        """engine_blocks: the KV cache blocks of each engine core (data-parallel rank),
        which weigh their cache usage in the total."""
        # no `_created` series next to every counter and histogram (as vLLM's server)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.engine_blocks = engine_blocks or [1]
        self.engine_stats = [SchedulerStats() for _ in self.engine_blocks]
        self._seqs: dict[str, _Seq] = {}  # core request id -> its timing
        self._last_step_time = [0.0 for _ in self.engine_blocks]  # of each engine core
        # totals for the periodic log line
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_stats = SchedulerStats()
        self._build()

    def _build(self) -> None:
        name, reg, labels = self.model_name, self.registry, ["model_name"]

        def gauge(metric: str, doc: str) -> Any:
            return Gauge(PREFIX + metric, doc, labels, registry=reg).labels(name)

        def counter(metric: str, doc: str) -> Any:
            return Counter(PREFIX + metric, doc, labels, registry=reg).labels(name)

        def histogram(metric: str, doc: str, buckets: tuple) -> Any:
            return Histogram(PREFIX + metric, doc, labels, buckets=buckets, registry=reg).labels(
                name
            )

        self.running = gauge("num_requests_running", "Requests in the engine's running set.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted by the scheduler.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter(
            PREFIX + "request_success",
            "Finished sequences, by finish reason.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between two outputs of a request.", ITL_BUCKETS
        )
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to last output.", LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Arrival to the start of the engine step that first ran the request.",
            LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        families = {
            attr: kind(PREFIX + "per_engine_" + metric, doc, ["model_name", "engine"], registry=reg)
            for attr, kind, metric, doc in PER_ENGINE
        }
        self.engines = [
            _EngineMetrics(families, name, str(i)) for i in range(len(self.engine_blocks))
        ]

    def success(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    # ---- engine outputs -----------------------------------------------------------
    def on_engine_outputs(self, msg: EngineCoreOutputs, engine: int = 0) -> None:
        """A stats listener of the engine client: runs on every batch of outputs of
        engine core `engine`, so that token timing is the same whether the client
        streams or not."""
        ended = sum(1 for o in msg.outputs if o.finished)
        if ended:
            self.engines[engine].finished.inc(ended)
        if msg.stats is None:
            return  # an abort or a rejection, not a step: no tokens
        now = time.perf_counter()
        step_start = self._last_step_time[engine] or msg.timestamp
        seqs = self._seqs
        new_tokens = 0
        for o in msg.outputs:
            count = len(o.new_token_ids)
            seq = seqs.get(o.request_id) if count else None
            if seq is None:
                continue
            new_tokens += count
            if seq.first is None:
                seq.first = now
                self.ttft.observe(now - seq.arrival)
                # queued from arrival until the step that first ran it began (about when
                # the previous step ended)
                self.queue_time.observe(max(0.0, step_start - seq.arrival_wall))
            else:
                self.itl.observe(now - seq.last)
            seq.last = now
            seq.tokens += count
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            self.engines[engine].generation_tokens.inc(new_tokens)
            self.generation_tokens_total += new_tokens
        self._last_step_time[engine] = msg.timestamp
        self.on_stats(msg.stats, engine)

    def on_stats(self, stats: SchedulerStats, engine: int = 0) -> None:
        """The latest step stats of one engine core; the totals follow."""
        self.engines[engine].on_stats(stats)
        self.engine_stats[engine] = stats
        total = total_stats(self.engine_stats, self.engine_blocks)
        self.last_stats = total
        self.running.set(total.num_running)
        self.waiting.set(total.num_waiting)
        self.kv_usage.set(total.kv_cache_usage)
        # the core hands these out as "since the last report": this core's share only
        _inc(self.prefix_queries, stats.prefix_cache_queries)
        _inc(self.prefix_hits, stats.prefix_cache_hits)
        _inc(self.preemptions, stats.num_preempted)

    async def refresh(self, client: Any) -> None:
        """Fresh step stats from every core: an idle core sends none by itself, so after
        the last request leaves, only this brings the gauges back to zero."""
        if client.errored:
            return
        try:
            raw = await asyncio.wait_for(client.call_each("get_stats"), STATS_CALL_TIMEOUT_S)
            for engine, stats in enumerate(raw):
                self.on_stats(as_stats(stats), engine)
        except (asyncio.TimeoutError, RuntimeError, TypeError, msgspec.ValidationError) as error:
            logger.warning("no fresh engine stats for /metrics: %s", error)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- requests -----------------------------------------------------------------
    def track(self, request_id: str, num_prompt_tokens: int, n: int) -> RequestTracker:
        """Start timing one user request (one prompt) with `n` sequences; call `finish`
        on the result when the request ends, however it ends."""
        seq_ids = child_request_ids(request_id, n)
        for seq_id in seq_ids:
            self._seqs[seq_id] = _Seq()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prompt_tokens_total += num_prompt_tokens
        self.request_prompt_tokens.observe(num_prompt_tokens)
        return RequestTracker(self, seq_ids)


def _inc(counter: Any, amount: int) -> None:
    if amount:
        counter.inc(amount)


# The per-engine families: key, kind, name after `tessera:per_engine_`, doc.
PER_ENGINE = (
    ("running", Gauge, "num_requests_running", "Requests in the core's running set."),
    ("waiting", Gauge, "num_requests_waiting", "Requests waiting in the core."),
    ("kv_usage", Gauge, "kv_cache_usage_perc", "Fraction of the core's KV cache in use (0-1)."),
    ("prefix_queries", Counter, "prefix_cache_queries", "Prompt tokens looked up in its cache."),
    ("prefix_hits", Counter, "prefix_cache_hits", "Prompt tokens found in its prefix cache."),
    ("preemptions", Counter, "num_preemptions", "Requests the core preempted."),
    ("generation_tokens", Counter, "generation_tokens", "Tokens the core generated."),
    ("finished", Counter, "requests_finished", "Sequences the core ended (any reason)."),
)


class _EngineMetrics:
    """The step figures of one engine core (data-parallel rank), labelled engine=<rank>."""

    def __init__(self, families: dict[str, Any], model_name: str, engine: str) -> None:
        def series(attr: str) -> Any:
            return families[attr].labels(model_name, engine)

        self.running = series("running")
        self.waiting = series("waiting")
        self.kv_usage = series("kv_usage")
        self.prefix_queries = series("prefix_queries")
        self.prefix_hits = series("prefix_hits")
        self.preemptions = series("preemptions")
        self.generation_tokens = series("generation_tokens")
        self.finished = series("finished")

    def on_stats(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        _inc(self.prefix_queries, stats.prefix_cache_queries)
        _inc(self.prefix_hits, stats.prefix_cache_hits)
        _inc(self.preemptions, stats.num_preempted)


class _Seq:
    """Timing of one sequence (a core request), filled in by the stats listener."""

    __slots__ = ("arrival_wall", "arrival", "first", "last", "tokens")

    def __init__(self) -> None:
        self.arrival_wall = time.time()  # the engine's clock, for queue time
        self.arrival = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.tokens = 0


class RequestTracker:
    """The handle of one tracked request; `finish` records how its sequences ended."""

    __slots__ = ("metrics", "seq_ids", "done")

    def __init__(self, metrics: ServerMetrics, seq_ids: list[str]) -> None:
        self.metrics = metrics
        self.seq_ids = seq_ids
        self.done = False

    def finish(self, reasons: list[str | None]) -> None:
        """`reasons[i]`: how sequence i ended (None: cut off, e.g. by a client that left,
        counted as abort)."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        now = time.perf_counter()
        for seq_id, reason in zip(self.seq_ids, reasons, strict=False):
            seq = m._seqs.pop(seq_id, None)
            if seq is None:
                continue
            m.success(reason or "abort")
            end = seq.last if seq.first is not None else now
            m.e2e.observe(end - seq.arrival)
            m.request_generation_tokens.observe(seq.tokens)
            if seq.first is not None and seq.tokens > 1:
                m.tpot.observe((seq.last - seq.first) / (seq.tokens - 1))


class StatsLogger:
    """Logs throughput and engine load every `interval` seconds while there is activity."""

    def __init__(self, metrics: ServerMetrics, interval: float = 10.0) -> None:
        self.metrics = metrics
        self.interval = interval
        self._prompt = 0
        self._generation = 0
        self._time = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.log_once()

    def log_once(self) -> None:
        m = self.metrics
        now = time.monotonic()
        elapsed = max(now - self._time, 1e-9)
        prompt = m.prompt_tokens_total - self._prompt
        generation = m.generation_tokens_total - self._generation
        stats = m.last_stats
        self._prompt, self._generation, self._time = (
            m.prompt_tokens_total,
            m.generation_tokens_total,
            now,
        )
        if not (prompt or generation or stats.num_running or stats.num_waiting):
            return
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%",
            prompt / elapsed,
            generation / elapsed,
            stats.num_running,
            stats.num_waiting,
            stats.kv_cache_usage * 100,
        )
