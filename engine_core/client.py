"""Clients of the engine core: in-process, and over ZMQ to a spawned core process.

Both give the offline `LLM` one interface: add_request, abort, get_outputs, call.
`CoreProcess` starts the engine-core process and runs the startup handshake; the
async client of the API server (async_client.py) uses it too.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import time
import weakref
from collections import deque
from typing import Any

import msgspec
import zmq

from engine_core.core import EngineCore
from engine_core.core_proc import CoreAddresses, CoreReady, HandshakeMessage, run_engine_core
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
from executor.config import EngineConfig
from executor.ipc import IpcDir, Receiver, Sender, spawn_process

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = float(os.environ.get("TESSERA_ENGINE_READY_TIMEOUT_S", "600"))
POLL_MS = 100


class EngineDeadError(RuntimeError):
    """The engine core (or one of its workers) died; every request in flight failed."""


_live_clients: weakref.WeakSet[Any] = weakref.WeakSet()  # objects with shutdown()
_live_cores: weakref.WeakSet[CoreProcess] = weakref.WeakSet()


@atexit.register
def close_live_cores() -> None:
    """Shut down every engine client and core process still running.

    Runs at exit before multiprocessing's own hook (which would wait forever on a core
    that is still serving) and before pyzmq's (which would wait forever on open
    sockets); also callable from signal handlers.
    """
    for client in list(_live_clients):
        client.shutdown()
    for core in list(_live_cores):
        core.close()


class CoreProcess:
    """A spawned engine-core process, its sockets, and the startup handshake."""

    def __init__(self, config: EngineConfig, ctx: zmq.Context) -> None:
        self.ipc = IpcDir()
        self.addrs = CoreAddresses(
            self.ipc.address("hs"),
            self.ipc.address("in"),
            self.ipc.address("out"),
            os.path.join(self.ipc.path, "engine-core.log"),
            self.ipc.path,
        )
        self.input: Sender[ClientMessage] = Sender(ctx, zmq.PUSH, self.addrs.input, bind=True)
        self._ctx = ctx
        level = logging.getLogger().getEffectiveLevel()
        self.proc = spawn_process(run_engine_core, (self.addrs, level), "tessera-engine-core")
        _live_cores.add(self)
        self.ready = self._handshake(config)

    def _handshake(self, config: EngineConfig) -> CoreReady:
        hs = self._ctx.socket(zmq.PAIR)
        hs.setsockopt(zmq.LINGER, 0)
        hs.bind(self.addrs.handshake)
        dec = msgspec.msgpack.Decoder(HandshakeMessage)
        try:
            self._wait(hs, "say hello")
            dec.decode(hs.recv())  # CoreHello
            hs.send(config.encode())
            self._wait(hs, "become ready")
            ready = dec.decode(hs.recv())
        finally:
            hs.close(linger=0)
        if not isinstance(ready, CoreReady) or ready.error is not None:
            err = ready.error if isinstance(ready, CoreReady) else "bad handshake"
            self.close()
            raise RuntimeError(f"the engine core failed to start:\n{err}")
        return ready

    def _wait(self, sock: zmq.Socket, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not sock.poll(POLL_MS):
            if not self.proc.is_alive():
                self.close()
                raise RuntimeError(
                    f"the engine core exited (code {self.proc.exitcode}) before it could "
                    f"{what}; its last log lines:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(
                    f"the engine core did not {what} within {READY_TIMEOUT_S:.0f} s "
                    f"(TESSERA_ENGINE_READY_TIMEOUT_S); its last log lines:\n{self.log_tail()}"
                )

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.addrs.log_file) as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return "(no log)"

    def output_receiver(self, ctx: zmq.Context) -> Receiver[CoreMessage]:
        return Receiver(ctx, zmq.PULL, self.addrs.output, True, CoreMessage)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def death_reason(self) -> str:
        return f"the engine core process died (exit code {self.proc.exitcode})"

    def close(self, timeout: float = 10.0) -> None:
        _live_cores.discard(self)
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: the core shuts its workers down
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.input.close()
        self.ipc.close()


class InprocClient:
    """The engine core in this process: get_outputs() runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.num_blocks = self.core.num_blocks
        self._pending: list = []

    def add_request(self, req: EngineCoreRequest) -> None:
        rejected = self.core.add_request(req)
        if rejected is not None:
            self._pending.append(rejected)

    def abort(self, request_ids: list[str]) -> None:
        self._pending += self.core.abort_requests(request_ids)

    def get_outputs(self) -> EngineCoreOutputs:
        outs = self.core.step() if self.core.has_work() else EngineCoreOutputs()
        if self._pending:
            outs.outputs = self._pending + outs.outputs
            self._pending = []
        return outs

    def call(self, method: str, *args: Any) -> Any:
        return self.core.call_utility(method, list(args))

    def shutdown(self) -> None:
        self.core.shutdown()


class SyncMPClient:
    """The engine core in its own process, driven synchronously (offline LLM)."""

    def __init__(self, config: EngineConfig) -> None:
        self._ctx = zmq.Context()
        self.core = CoreProcess(config, self._ctx)
        self.num_blocks = self.core.ready.num_blocks
        self._out = self.core.output_receiver(self._ctx)
        self._call_ids = itertools.count(1)
        self._dead: str | None = None
        _live_clients.add(self)

    def add_request(self, req: EngineCoreRequest) -> None:
        self._send(req)

    def abort(self, request_ids: list[str]) -> None:
        self._send(AbortRequests(request_ids))

    def _send(self, msg: ClientMessage) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self.core.input.send(msg)

    def _recv(self) -> CoreMessage:
        while not self._out.sock.poll(POLL_MS):
            if not self.core.alive:
                self._dead = self.core.death_reason()
                raise EngineDeadError(self._dead)
        msg = self._out.recv()
        if isinstance(msg, EngineDead):
            self._dead = f"the engine died: {msg.reason}"
            raise EngineDeadError(self._dead)
        return msg

    def get_outputs(self) -> EngineCoreOutputs:
        while True:
            msg = self._recv()
            if isinstance(msg, EngineCoreOutputs):
                return msg

    def call(self, method: str, *args: Any) -> Any:
        call_id = next(self._call_ids)
        self._send(UtilityCall(call_id, method, list(args)))
        while True:
            msg = self._recv()
            if isinstance(msg, UtilityResult) and msg.call_id == call_id:
                if msg.error is not None:
                    raise RuntimeError(f"{method} failed in the engine core: {msg.error}")
                return msg.result

    def shutdown(self) -> None:
        _live_clients.discard(self)
        if self._ctx.closed:
            return
        self.core.close()
        self._out.close()
        self._ctx.destroy(linger=0)


def make_sync_client(config: EngineConfig) -> InprocClient | SyncMPClient:
    """Multiprocess unless TESSERA_ENABLE_MULTIPROCESSING=0. Under external_launcher
    the core always runs in the calling process: that process is the rank torchrun
    started, and its worker must be there too."""
    if (
        os.environ.get("TESSERA_ENABLE_MULTIPROCESSING", "1") == "0"
        or config.parallel.distributed_executor_backend == "external_launcher"
    ):
        return InprocClient(config)
    return SyncMPClient(config)
