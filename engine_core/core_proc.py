"""The engine-core process: a busy loop with an input and an output IO thread.

The loop drains the input queue, runs one engine step and queues the outputs; the
IO threads move frames between the ZMQ sockets and those queues (decoding and
encoding there), so the loop itself never touches a socket. With no work the loop
blocks on the input queue instead of spinning.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import traceback
from typing import Any

import msgspec
import zmq

from engine_core.core import EngineCore
from engine_core.messages import (
    AbortRequests,
    ClientMessage,
    CoreMessage,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    UtilityCall,
    UtilityResult,
)
from executor import step_trace
from executor.config import EngineConfig
from executor.heap import freeze_startup_heap, thaw_heap
from executor.ipc import IPC_ROOT_ENV, Receiver, Sender, die_with_parent

logger = logging.getLogger(__name__)


class CoreAddresses(msgspec.Struct, frozen=True):
    handshake: str  # PAIR: HELLO -> config bytes -> READY
    input: str  # client PUSH -> core PULL
    output: str  # core PUSH -> client PULL
    log_file: str  # where this process logs, so the client can quote it on failure
    ipc_root: str  # the client's ipc folder: ours go inside it
    name: str = "engine-core"  # in log lines; engine-core<rank> with data parallelism


class CoreHello(msgspec.Struct, tag=True):
    pid: int


class CoreReady(msgspec.Struct, tag=True):
    num_blocks: int = 0
    max_model_len: int = 0
    error: str | None = None


HandshakeMessage = CoreHello | CoreReady


IDLE_WAKE_S = 0.1


class _Stop:
    """Queued by a signal handler or a dead worker: leave the loop."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason


def run_engine_core(addrs: CoreAddresses, log_level: int) -> None:
    """Entry point of the spawned engine-core process."""
    die_with_parent()
    os.environ[IPC_ROOT_ENV] = addrs.ipc_root
    _setup_logging(addrs.log_file, log_level, addrs.name)
    ctx = zmq.Context()
    hs = ctx.socket(zmq.PAIR)
    hs.setsockopt(zmq.LINGER, 1000)
    hs.connect(addrs.handshake)
    hs.send(msgspec.msgpack.encode(CoreHello(os.getpid())))
    config = EngineConfig.decode(hs.recv())
    try:
        core = EngineCore(config)
    except Exception:
        logger.exception("engine core failed to start")
        hs.send(msgspec.msgpack.encode(CoreReady(error=traceback.format_exc())))
        hs.close()
        ctx.destroy(linger=1)
        raise SystemExit(1) from None
    hs.send(msgspec.msgpack.encode(CoreReady(core.num_blocks, config.model.max_model_len)))
    hs.close()
    freeze_startup_heap("engine core")
    proc = EngineCoreProc(core, ctx, addrs)
    step_trace.start()
    try:
        proc.run()
    finally:
        step_trace.dump("core")
        proc.close()
        thaw_heap()


def _setup_logging(log_file: str, level: int, process_name: str) -> None:
    fmt = f"%(asctime)s {process_name} %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(), logging.FileHandler(log_file)]
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)


class EngineCoreProc:
    def __init__(self, core: EngineCore, ctx: zmq.Context, addrs: CoreAddresses) -> None:
        self.core = core
        # SimpleQueue: its put is reentrant, so the signal handler below may put while
        # the interrupted main thread is inside get. queue.Queue's put would wait for the
        # lock the main thread holds: the core hung on SIGTERM until killed, now and then.
        self.inq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outq: queue.Queue[Any] = queue.Queue()
        self._input: Receiver[ClientMessage] = Receiver(
            ctx, zmq.PULL, addrs.input, False, ClientMessage
        )
        self._output: Sender[CoreMessage] = Sender(ctx, zmq.PUSH, addrs.output, bind=False)
        self._ctx = ctx
        self._threads = [
            threading.Thread(target=self._input_loop, daemon=True, name="core-input"),
            threading.Thread(target=self._output_loop, daemon=True, name="core-output"),
        ]
        for t in self._threads:
            t.start()
        executor = core.executor
        if hasattr(executor, "on_worker_death"):
            executor.on_worker_death = lambda reason: self.inq.put(_Stop(reason))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.inq.put(_Stop(None)))

    # ---- IO threads ---------------------------------------------------------------
    def _input_loop(self) -> None:
        # This thread owns the input socket: it closes it when the context terminates
        # (a socket must never be closed from another thread while in use).
        while True:
            try:
                frame = self._input.sock.recv(copy=False)
            except zmq.ZMQError:
                self._input.close()
                return
            try:
                self.inq.put(self._input.decode(frame.buffer))
            except msgspec.DecodeError as e:
                logger.error("malformed client frame dropped: %s", e)

    def _output_loop(self) -> None:
        enc = msgspec.msgpack.Encoder()
        while True:
            msg = self.outq.get()
            if msg is None:
                break
            try:
                self._output.send_bytes(enc.encode(msg))
            except zmq.ZMQError:
                break
        self._output.close(linger_ms=2000)  # let a final EngineDead reach the client

    # ---- the busy loop ------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                stop = self._drain(block=not self.core.has_work())
                if stop is not None:
                    if stop.reason is not None:
                        self.outq.put(EngineDead(stop.reason))
                    return
                if self.core.has_work():
                    self.outq.put(self.core.step())
        except Exception:
            reason = traceback.format_exc()
            logger.error("engine core failed:\n%s", reason)
            self.outq.put(EngineDead(reason))

    def _drain(self, block: bool) -> _Stop | None:
        try:
            # An idle wait wakes every IDLE_WAKE_S: a SIGTERM that the kernel hands to an
            # IO thread does not interrupt this thread's wait, and its Python handler
            # runs only once this thread runs Python again (without the wake the core
            # sat out the client's 10 s grace and was killed, now and then).
            msg = self.inq.get(block=block, timeout=IDLE_WAKE_S if block else None)
        except queue.Empty:
            return None
        while True:
            if isinstance(msg, _Stop):
                return msg
            self._handle(msg)
            try:
                msg = self.inq.get_nowait()
            except queue.Empty:
                return None

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, EngineCoreRequest):
            rejected = self.core.add_request(msg)
            if rejected is not None:
                self.outq.put(EngineCoreOutputs([rejected]))
        elif isinstance(msg, AbortRequests):
            outs = self.core.abort_requests(msg.request_ids)
            if outs:
                self.outq.put(EngineCoreOutputs(outs))
        elif isinstance(msg, UtilityCall):
            self.outq.put(self._utility(msg))

    def _utility(self, call: UtilityCall) -> UtilityResult:
        try:
            return UtilityResult(call.call_id, self.core.call_utility(call.method, call.args))
        except Exception as e:
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        self.outq.put(None)
        self._threads[1].join(timeout=5)
        try:
            self.core.shutdown()
        finally:
            self._ctx.term()  # wakes the input thread, which closes its socket
