"""The asyncio client of the engine core, used by the HTTP server.

One output-handler task receives every `EngineCoreOutputs`, detokenizes
incrementally (OutputProcessor), applies stop strings (aborting the request in the
core when one hits) and feeds one asyncio queue per request. Cancelling a request's
stream aborts it in the core, which frees its KV blocks. If the core process dies,
every stream ends with `EngineDeadError` and `errored` turns True.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from engine_core.client import CoreProcess, EngineDeadError
from engine_core.config import ConfigError
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
from executor.ipc import Receiver

logger = logging.getLogger(__name__)


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.inputs = InputProcessor(config, tokenizer)
        self.outputs = OutputProcessor(tokenizer)
        self._sync_ctx = zmq.Context()
        self._core: CoreProcess | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        self._dead: str | None = None
        self._tasks: list[asyncio.Task] = []
        self.num_blocks = 0
        self._actx: zmq.asyncio.Context | None = None
        self._out: Receiver[CoreMessage] | None = None
        self.last_stats = SchedulerStats()
        self.stats_listeners: list[Any] = []  # callables(EngineCoreOutputs), e.g. metrics

    @classmethod
    async def start(cls, config: EngineConfig, tokenizer: Any | None) -> AsyncEngineClient:
        if config.parallel.distributed_executor_backend == "external_launcher":
            raise ConfigError(
                "distributed_executor_backend",
                "external_launcher",
                "it runs the offline LLM in each torchrun rank; a server needs mp or uni",
            )
        self = cls(config, tokenizer)
        loop = asyncio.get_running_loop()
        # the handshake blocks (model loading): keep the event loop free meanwhile
        self._core = await loop.run_in_executor(None, CoreProcess, config, self._sync_ctx)
        self.num_blocks = self._core.ready.num_blocks
        self._actx = zmq.asyncio.Context()
        self._out = self._core.output_receiver(self._actx)
        self._tasks = [
            asyncio.create_task(self._output_handler(), name="engine-outputs"),
            asyncio.create_task(self._watch_core(), name="engine-watch"),
        ]
        return self

    # ---- state --------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

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
        queue = self._add(request_id, text, ids, params, priority)
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

    def _add(self, request_id, text, ids, params, priority) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.inputs.check_token_ids(ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self.outputs.add_request(request_id, text, ids, params)
        assert self._core is not None
        for req in self.inputs.make_requests(request_id, ids, params, priority):
            self._core.input.send(req)
        return queue

    def _abort_now(self, request_id: str) -> None:
        core_ids = self.outputs.abort(request_id)
        if core_ids and self._dead is None and self._core is not None:
            self._core.input.send(AbortRequests(core_ids))

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    async def call(self, method: str, *args: Any) -> Any:
        """A utility call in the engine core (reset_prefix_cache, collective_rpc, ...)."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        assert self._core is not None
        self._core.input.send(UtilityCall(call_id, method, list(args)))
        return await fut

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """Call `method(*args)` on every worker; one result per rank, in rank order."""
        return await self.call("collective_rpc", method, list(args))

    # ---- the output handler -------------------------------------------------------
    async def _output_handler(self) -> None:
        out = self._out
        assert out is not None
        while True:
            frame = await out.sock.recv(copy=False)  # type: ignore[misc]
            try:
                msg = out.decode(frame.buffer)
            except Exception:
                logger.exception("malformed engine frame dropped")
                continue
            if isinstance(msg, EngineCoreOutputs):
                self._on_outputs(msg)
            elif isinstance(msg, UtilityResult):
                self._on_result(msg)
            elif isinstance(msg, EngineDead):
                self._fail_all(f"the engine died: {msg.reason}")
                return

    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        results, to_abort = self.outputs.process(msg.outputs)
        if to_abort and self._core is not None:
            self._core.input.send(AbortRequests(to_abort))
        for r in results:
            queue = self._streams.get(r.request_id)
            if queue is not None:
                queue.put_nowait(r)
        if msg.stats is not None:
            self.last_stats = msg.stats
        for listener in self.stats_listeners:
            listener(msg)

    def _on_result(self, msg: UtilityResult) -> None:
        fut = self._calls.pop(msg.call_id, None)
        if fut is None or fut.done():
            return
        if msg.error is not None:
            fut.set_exception(RuntimeError(msg.error))
        else:
            fut.set_result(msg.result)

    async def _watch_core(self) -> None:
        assert self._core is not None
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        sentinel = self._core.proc.sentinel

        def on_exit() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(sentinel, on_exit)
        try:
            await ended
        finally:
            loop.remove_reader(sentinel)
        await asyncio.sleep(0.2)  # let a final EngineDead message arrive first
        if self._dead is None:
            self._fail_all(self._core.death_reason())

    def _fail_all(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        logger.error(reason)
        self.outputs.fail_all(reason)
        for queue in self._streams.values():
            queue.put_nowait(EngineDeadError(reason))
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        self._calls.clear()

    # ---- shutdown -----------------------------------------------------------------
    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._core is not None:
            core, self._core = self._core, None
            await asyncio.get_running_loop().run_in_executor(None, core.close)
        if self._out is not None and self._actx is not None:
            self._out.close()
            self._actx.destroy(linger=0)
        self._sync_ctx.destroy(linger=0)
