"""The asyncio client of the engine cores, used by the HTTP server.

One engine core per data-parallel rank (one without data parallelism); each new
request goes to the least-loaded core (dp.LoadBalancer), with all its n sequences.
One output-handler task per core receives its `EngineCoreOutputs`, detokenizes
incrementally (OutputProcessor), applies stop strings (aborting the request in the
core when one hits) and feeds one asyncio queue per request. Cancelling a request's
stream aborts it in its core, which frees its KV blocks. If a core process dies, the
streams of its requests end with `EngineDeadError` and `errored` turns True: new
requests are refused, those on the other cores run to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from engine_core.client import CoreProcess, EngineDeadError, start_cores, stop_cores
from engine_core.config import ConfigError
from engine_core.dp import LoadBalancer, combine_results, total_stats
from engine_core.messages import (
    AbortRequests,
    CoreMessage,
    EngineCoreOutputs,
    EngineDead,
    SchedulerStats,
    UtilityCall,
    UtilityResult,
)
from engine_core.output_processor import OutputProcessor
from engine_core.outputs import RequestOutput
from engine_core.processor import InputProcessor, PromptType
from engine_core.sampling_params import SamplingParams
from executor.config import EngineConfig
from executor.ipc import Receiver, make_context

logger = logging.getLogger(__name__)


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self._use_tokenizer(tokenizer)
        num_cores = config.parallel.data_parallel_size
        self.balancer = LoadBalancer(num_cores)
        self._sync_ctx = make_context(zmq.Context)
        self._cores: list[CoreProcess] = []
        self._outs: list[Receiver[CoreMessage]] = []
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._core_of: dict[str, int] = {}  # user request id -> the core that runs it
        self._calls: dict[int, list[asyncio.Future]] = {}  # call id -> one future per core
        self._call_ids = itertools.count(1)
        self._dead: str | None = None
        self._dead_cores: set[int] = set()  # dead or stopped: nothing more is sent there
        self._stopped = False
        self._tasks: list[asyncio.Task] = []
        self.core_num_blocks: list[int] = []
        self.num_blocks = 0
        self._actx: zmq.asyncio.Context | None = None
        self.core_stats = [SchedulerStats() for _ in range(num_cores)]  # latest of each
        self.last_stats = SchedulerStats()  # of all cores together
        # callables(EngineCoreOutputs, core index), e.g. the server's metrics
        self.stats_listeners: list[Any] = []

    def _use_tokenizer(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.inputs = InputProcessor(self.config, tokenizer)
        self.outputs = OutputProcessor(tokenizer)

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        tokenizer: Any | None = None,
        *,
        load_tokenizer: Callable[[], Any | None] | None = None,
    ) -> AsyncEngineClient:
        """Start the engine cores; ready once all are. load_tokenizer (instead of a
        tokenizer) runs in a thread once the cores have their configs: importing
        transformers (and torch) takes seconds, which then overlap the cores' own start
        instead of coming before it, or holding this process's interpreter while the
        handshake with the cores needs it."""
        if config.parallel.distributed_executor_backend == "external_launcher":
            raise ConfigError(
                "distributed_executor_backend",
                "external_launcher",
                "it runs the offline LLM in each torchrun rank; a server needs mp or uni",
            )
        self = cls(config, None)
        loop = asyncio.get_running_loop()
        # the handshake blocks (model loading): keep the event loop free meanwhile
        configured = loop.create_future()
        starting: list[CoreProcess] = []

        def set_configured() -> None:
            if not configured.done():
                configured.set_result(None)

        def on_configured(cores: list[CoreProcess]) -> None:  # in start_cores' thread
            starting.extend(cores)
            loop.call_soon_threadsafe(set_configured)

        cores = loop.run_in_executor(None, start_cores, config, self._sync_ctx, on_configured)
        try:
            if load_tokenizer is not None:
                await asyncio.wait({cores, configured}, return_when=asyncio.FIRST_COMPLETED)
                if cores.done():
                    await cores  # raises if the cores failed before their configs
                tokenizer = await loop.run_in_executor(None, load_tokenizer)
            self._use_tokenizer(tokenizer)
            self._cores = await cores
        except BaseException:
            await _stop_starting(cores, starting)
            self._sync_ctx.destroy(linger=0)
            raise
        self.core_num_blocks = [core.num_blocks for core in self._cores]
        self.num_blocks = sum(self.core_num_blocks)
        self._actx = make_context(zmq.asyncio.Context)
        self._outs = [core.output_receiver(self._actx) for core in self._cores]
        for i in range(len(self._cores)):
            self._tasks.append(asyncio.create_task(self._output_handler(i), name=f"outputs{i}"))
            self._tasks.append(asyncio.create_task(self._watch_core(i), name=f"watch{i}"))
        return self

    # ---- state --------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    @property
    def num_cores(self) -> int:
        return len(self._cores)

    def num_unfinished(self) -> int:
        return self.outputs.num_unfinished()

    # ---- requests -----------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (per params.output_kind). Abort on cancellation."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        text, ids = self.inputs.tokenize(prompt)
        salt = self.inputs.cache_salt(prompt)
        queue = self._add(request_id, text, ids, params, priority, salt)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)
            self._core_of.pop(request_id, None)

    def _add(self, request_id, text, ids, params, priority, salt=None) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.inputs.check_token_ids(ids)
        requests = self.inputs.make_requests(request_id, ids, params, priority, cache_salt=salt)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self.outputs.add_request(request_id, text, ids, params)
        # all n sequences on one core: they share the prompt's KV blocks there
        core = self.balancer.pick()
        self._core_of[request_id] = core
        self.balancer.assign(core, [req.request_id for req in requests])
        for req in requests:
            self._cores[core].input.send(req)
        return queue

    def _abort_now(self, request_id: str) -> None:
        core_ids = self.outputs.abort(request_id)
        core = self._core_of.get(request_id)
        if core_ids and core is not None and core not in self._dead_cores:
            self._cores[core].input.send(AbortRequests(core_ids))

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    async def call(self, method: str, *args: Any) -> Any:
        """A utility call in the engine cores (reset_prefix_cache, collective_rpc, ...):
        every core's answer combined into one (see dp.combine_results)."""
        return combine_results(method, await self.call_each(method, *args), self.core_num_blocks)

    async def call_each(self, method: str, *args: Any) -> list[Any]:
        """A utility call in every engine core; their answers in rank order."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in self._cores]
        self._calls[call_id] = futures
        try:
            for core in self._cores:
                core.input.send(UtilityCall(call_id, method, list(args)))
            return list(await asyncio.gather(*futures))
        finally:
            self._calls.pop(call_id, None)

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """Call `method(*args)` on every worker; one result per rank, in rank order."""
        return await self.call("collective_rpc", method, list(args))

    # ---- the output handlers ------------------------------------------------------
    async def _output_handler(self, core: int) -> None:
        out = self._outs[core]
        while True:
            frame = await out.sock.recv(copy=False)  # type: ignore[misc]
            try:
                msg = out.decode(frame.buffer)
            except Exception:
                logger.exception("malformed engine frame dropped")
                continue
            if isinstance(msg, EngineCoreOutputs):
                self._on_outputs(core, msg)
            elif isinstance(msg, UtilityResult):
                self._on_result(core, msg)
            elif isinstance(msg, EngineDead):
                self._core_died(core, f"the engine died: {msg.reason}")
                return

    def _on_outputs(self, core: int, msg: EngineCoreOutputs) -> None:
        for o in msg.outputs:
            if o.finished:
                self.balancer.finished(o.request_id)
        results, to_abort = self.outputs.process(msg.outputs)
        if to_abort and core not in self._dead_cores:
            self._cores[core].input.send(AbortRequests(to_abort))
        for r in results:
            queue = self._streams.get(r.request_id)
            if queue is not None:
                queue.put_nowait(r)
        if msg.stats is not None:
            self.balancer.report(core, msg.stats)
            self.core_stats[core] = msg.stats
            self.last_stats = total_stats(self.core_stats, self.core_num_blocks)
        for listener in self.stats_listeners:
            listener(msg, core)

    def _on_result(self, core: int, msg: UtilityResult) -> None:
        futures = self._calls.get(msg.call_id)
        if futures is None or futures[core].done():
            return
        if msg.error is not None:
            futures[core].set_exception(RuntimeError(msg.error))
        else:
            futures[core].set_result(msg.result)

    async def _watch_core(self, core: int) -> None:
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        process = self._cores[core]
        sentinel = process.proc.sentinel

        def on_exit() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(sentinel, on_exit)
        try:
            await ended
        finally:
            loop.remove_reader(sentinel)
        await asyncio.sleep(0.2)  # let a final EngineDead message arrive first
        self._core_died(core, process.death_reason())

    def _core_died(self, core: int, reason: str) -> None:
        """End the requests and calls of a dead core; the client is unhealthy from now."""
        if core in self._dead_cores:
            return
        self._dead_cores.add(core)
        if self._dead is None:
            self._dead = reason
        logger.error(reason)
        for request_id in [r for r, c in self._core_of.items() if c == core]:
            self.outputs.abort(request_id)
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(EngineDeadError(reason))
        for futures in self._calls.values():
            if not futures[core].done():
                futures[core].set_exception(EngineDeadError(reason))

    # ---- shutdown -----------------------------------------------------------------
    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._stopped:
            return
        self._stopped = True
        # streams still open end without sending anything to a stopped core
        self._dead_cores.update(range(len(self._cores)))
        if self._cores:
            await asyncio.get_running_loop().run_in_executor(None, stop_cores, self._cores)
        if self._actx is not None:
            for out in self._outs:
                out.close()
            self._actx.destroy(linger=0)
        self._sync_ctx.destroy(linger=0)


async def _stop_starting(
    cores: asyncio.Future[list[CoreProcess]], starting: list[CoreProcess]
) -> None:
    """Stop this client's engine cores, starting or started, after a failure beside
    them (the tokenizer's). A core still starting is only signalled: start_cores, in its
    own thread, sees it exit and stops and closes them all."""
    if not cores.done():
        for core in starting:
            core.terminate()
        with contextlib.suppress(BaseException):
            await cores
    if not cores.cancelled() and cores.exception() is None:
        stop_cores(cores.result())
