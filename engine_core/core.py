"""The engine core: requests in, one scheduled step at a time, token outputs out.

`EngineCore.step()` is the whole engine step: schedule, execute, update. The busy
loop that runs it in its own process (with IO threads) wraps this class.

With pipeline parallelism (PP > 1) a step keeps the stages busy instead: it submits
micro-batches (each from requests not already in flight) until PP are in flight or
nothing more can be scheduled, then waits for the oldest, updates the scheduler with
it and returns its outputs. The next step refills the pipeline from the requests
that came back. Outputs come back in submission order (see executor/mp.py).

Async scheduling (PP = 1, the default with an executor whose `submit` returns at
once, i.e. mp) is the same loop with two steps in flight: step N+1 is scheduled and
sent while step N runs, so the worker finds its next step waiting instead of idling
through the engine core's update and schedule. `--disable-async-output-proc` turns
it off. See engine_core/scheduler/scheduler.py for what the scheduler assumes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from engine_core.kv_cache.manager import KVCacheManager
from engine_core.messages import (
    UTILITY_METHODS,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
)
from engine_core.request import Request
from engine_core.scheduler.scheduler import Scheduler
from executor import step_trace
from executor.base import Executor, make_executor
from executor.config import EngineConfig
from executor.messages import StepInput, StepOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.executor = executor or make_executor(config)
        t0 = time.monotonic()
        self.num_blocks = self.executor.initialize()
        self._check_capacity()
        cache = config.cache
        self.kv = KVCacheManager(
            self.num_blocks,
            cache.block_size,
            cache.enable_prefix_caching,
            cache.prefix_caching_hash_algo,
            config.model.max_model_len,
        )
        pp = config.parallel.pipeline_parallel_size
        overlap = pp == 1 and config.scheduler.async_scheduling and self.executor.overlaps_steps
        # steps in flight at once: a micro-batch per stage, or two with async scheduling
        self.pipeline_depth = 2 if overlap else pp
        self.scheduler = Scheduler(config.scheduler, self.kv, pp, async_scheduling=overlap)
        self.in_flight: deque[StepInput] = deque()  # submitted, not yet collected (PP > 1)
        logger.info(
            "engine ready in %.1f s: %d KV blocks of %d tokens",
            time.monotonic() - t0,
            self.num_blocks,
            cache.block_size,
        )

    def _check_capacity(self) -> None:
        tokens = (self.num_blocks - 1) * self.config.cache.block_size
        if tokens < self.config.model.max_model_len:
            raise ValueError(
                f"the KV cache holds {tokens} tokens ({self.num_blocks} blocks), fewer than "
                f"--max-model-len={self.config.model.max_model_len}: raise the cache size "
                "(--gpu-memory-utilization, --num-gpu-blocks-override, TESSERA_CPU_KVCACHE_SPACE) "
                "or lower --max-model-len"
            )

    # ---- requests -----------------------------------------------------------------
    def add_request(self, msg: EngineCoreRequest) -> EngineCoreOutput | None:
        """Queue a request; a request that can never run is answered at once with an error."""
        error = self._validate(msg)
        if error is not None:
            return EngineCoreOutput(
                msg.request_id, [], finish_reason=FinishReason.ERROR, error=error
            )
        self.scheduler.add_request(Request.from_message(msg))
        return None

    def _validate(self, msg: EngineCoreRequest) -> str | None:
        n = len(msg.prompt_token_ids)
        max_len = self.config.model.max_model_len
        if n == 0:
            return "the prompt is empty"
        if n >= max_len:
            return f"the prompt has {n} tokens, the maximum model length is {max_len}"
        limit = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(msg.sampling, name)
            if k is not None and k > limit:
                return f"{name}={k} is more than the maximum of {limit} (--max-logprobs)"
        if msg.request_id in self.scheduler.requests:
            return f"request id {msg.request_id!r} is already in use"
        return None

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort_requests(request_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    # ---- the step -----------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        if self.pipeline_depth > 1:
            return self._pipelined_step()
        step_input = self._schedule()
        if step_input is None:
            return EngineCoreOutputs([], self.scheduler.stats(), time.time())
        t0 = step_trace.now()
        step_output = self.executor.execute(step_input)
        step_trace.span("execute", step_input.step_id, t0)
        return self._update(step_input, step_output)

    def _pipelined_step(self) -> EngineCoreOutputs:
        while len(self.in_flight) < self.pipeline_depth:
            step_input = self._schedule()
            if step_input is None:
                break  # everything schedulable is in flight already
            t0 = step_trace.now()
            self.executor.submit(step_input)
            step_trace.span("submit", step_input.step_id, t0)
            self.in_flight.append(step_input)
        if not self.in_flight:
            return EngineCoreOutputs([], self.scheduler.stats(), time.time())
        t0 = step_trace.now()
        step_output = self.executor.collect()
        step_trace.span("collect", step_output.step_id, t0)
        step_input = self.in_flight.popleft()
        if step_output.error is None and step_output.step_id != step_input.step_id:
            raise RuntimeError(
                f"step {step_output.step_id} came back while step {step_input.step_id} "
                "was the oldest in flight"
            )
        return self._update(step_input, step_output)

    def _schedule(self) -> StepInput | None:
        """The next step, or None when nothing can be scheduled."""
        t0 = step_trace.now()
        step_input = self.scheduler.schedule()
        if not step_input.num_scheduled_tokens:
            return None
        step_trace.span("schedule", step_input.step_id, t0)
        return step_input

    def _update(self, step_input: StepInput, step_output: StepOutput) -> EngineCoreOutputs:
        if step_output.error is not None:
            raise RuntimeError(
                f"step {step_output.step_id} failed on a worker "
                f"(requests {list(step_input.num_scheduled_tokens)}): {step_output.error}"
            )
        t0 = step_trace.now()
        outputs = self.scheduler.update(step_input, step_output)
        step_trace.span("update", step_input.step_id, t0)
        stats = self.scheduler.stats()
        stats.step_tokens = step_input.total_num_scheduled_tokens
        return EngineCoreOutputs(outputs, stats, time.time())

    # ---- utility calls ------------------------------------------------------------
    def call_utility(self, method: str, args: list) -> Any:
        """A utility call from the client, by name (only the listed methods)."""
        if method not in UTILITY_METHODS:
            raise ValueError(f"unknown utility method {method!r}")
        impl = getattr(self, method, None)
        if impl is None:
            raise NotImplementedError(f"{method} is not available in this build")
        return impl(*args)

    def get_stats(self) -> dict:
        stats = self.scheduler.stats()
        return {name: getattr(stats, name) for name in stats.__struct_fields__}

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return self.executor.collective_rpc(method, tuple(args))

    def check_health(self) -> None:
        self.executor.check_health()

    def profile_start(self) -> None:
        self.executor.collective_rpc("profile_start")

    def profile_stop(self) -> list[str]:
        """The files every worker wrote (see executor/profiler.py)."""
        return [path for paths in self.executor.collective_rpc("profile_stop") for path in paths]

    def shutdown(self) -> None:
        self.executor.shutdown()
