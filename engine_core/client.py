"""Clients of the engine core: in-process, and over ZMQ to a spawned core process.

Both give the offline `LLM` one interface: add_request, abort, get_outputs, call.
`CoreProcess` starts an engine-core process and runs the startup handshake;
`start_cores` starts one per data-parallel rank (see dp.py). The async client of the
API server (async_client.py) uses them too.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing.util  # noqa: F401  (its exit hook first: see close_live_cores)
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from engine_core.config import ConfigError
from engine_core.core import EngineCore
from engine_core.core_proc import CoreAddresses, CoreReady, HandshakeMessage, run_engine_core
from engine_core.dp import LoadBalancer, combine_results, rank_configs
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
from executor.ipc import IpcDir, Receiver, Sender, make_context, spawn_process

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
    or worker that is still serving) and before pyzmq's (which would wait forever on
    open sockets): exit hooks run last-registered first, and multiprocessing registers
    its hook when multiprocessing.util is first imported, which this module therefore
    does before it registers this one. Also callable from signal handlers.
    """
    for client in list(_live_clients):
        client.shutdown()
    for core in list(_live_cores):
        core.close()


class CoreProcess:
    """A spawned engine-core process, its sockets, and the startup handshake.

    Starting takes three calls, so that the cores of several data-parallel ranks load
    their models at the same time (see `start_cores`): the constructor spawns the
    process, `send_config` answers its hello with the config, `await_ready` waits
    until its model and KV cache are ready.
    """

    def __init__(self, config: EngineConfig, ctx: zmq.Context) -> None:
        par = config.parallel
        self.config = config
        self.rank = par.data_parallel_rank
        name = "engine-core" if par.data_parallel_size == 1 else f"engine-core{self.rank}"
        self.label = (
            "the engine core"
            if par.data_parallel_size == 1
            else f"the engine core of data-parallel rank {self.rank}"
        )
        self.ipc = IpcDir()
        self.addrs = CoreAddresses(
            self.ipc.address("hs"),
            self.ipc.address("in"),
            self.ipc.address("out"),
            os.path.join(self.ipc.path, f"{name}.log"),
            self.ipc.path,
            name,
        )
        self.input: Sender[ClientMessage] = Sender(ctx, zmq.PUSH, self.addrs.input, bind=True)
        self._hs = ctx.socket(zmq.PAIR)
        self._hs.setsockopt(zmq.LINGER, 0)
        self._hs.bind(self.addrs.handshake)
        self._hs_decoder = msgspec.msgpack.Decoder(HandshakeMessage)
        self.ready: CoreReady | None = None
        level = logging.getLogger().getEffectiveLevel()
        try:
            self.proc = spawn_process(run_engine_core, (self.addrs, level), f"tessera-{name}")
        except BaseException:  # no process: nobody else would remove the sockets
            self.close_handshake()
            self.input.close()
            self.ipc.close()
            raise
        _live_cores.add(self)

    @property
    def num_blocks(self) -> int:
        assert self.ready is not None, "the engine core has not finished its handshake"
        return self.ready.num_blocks

    def send_config(self) -> None:
        self._wait("say hello")
        self._hs_decoder.decode(self._hs.recv())  # CoreHello
        self._hs.send(self.config.encode())

    def await_ready(self) -> None:
        self._wait("become ready")
        ready = self._hs_decoder.decode(self._hs.recv())
        self.close_handshake()
        if not isinstance(ready, CoreReady) or ready.error is not None:
            err = ready.error if isinstance(ready, CoreReady) else "bad handshake"
            raise RuntimeError(f"{self.label} failed to start:\n{err}")
        self.ready = ready

    def close_handshake(self) -> None:
        # Only from the thread that runs the handshake: a ZMQ socket must not be closed
        # while another thread polls it.
        self._hs.close(linger=0)

    def _wait(self, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._hs.poll(POLL_MS):
            if not self.proc.is_alive():
                raise RuntimeError(
                    f"{self.label} exited (code {self.proc.exitcode}) before it could "
                    f"{what}; its last log lines:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.label} did not {what} within {READY_TIMEOUT_S:.0f} s "
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
        return f"{self.label} process died (exit code {self.proc.exitcode})"

    def terminate(self) -> None:
        """SIGTERM: the core shuts its workers down and exits (close() waits for it)."""
        if self.proc.is_alive():
            self.proc.terminate()

    def close(self, timeout: float = 10.0) -> None:
        _live_cores.discard(self)
        self.terminate()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.input.close()
        self.ipc.close()


def start_cores(
    config: EngineConfig,
    ctx: zmq.Context,
    on_configured: Callable[[list[CoreProcess]], None] | None = None,
) -> list[CoreProcess]:
    """One engine-core process per data-parallel rank, all ready. They load their
    models at the same time; if one fails to start, all are stopped. on_configured gets
    the cores once every one has its config (and is loading on its own): terminating
    one of them then makes this call stop them all and raise."""
    cores: list[CoreProcess] = []
    try:
        for rank_config in rank_configs(config):
            cores.append(CoreProcess(rank_config, ctx))
        for core in cores:
            core.send_config()
        if on_configured is not None:
            on_configured(list(cores))
        for core in cores:
            core.await_ready()
    except BaseException:
        for core in cores:
            core.close_handshake()
        stop_cores(cores)
        raise
    return cores


def stop_cores(cores: list[CoreProcess]) -> None:
    """Signal every core first, so that they shut down side by side, then wait for each."""
    for core in cores:
        core.terminate()
    for core in cores:
        core.close()


class InprocClient:
    """The engine core in this process: get_outputs() runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.num_blocks = self.core.num_blocks
        self._pending: list = []
        # its executor's worker processes must stop at exit even without shutdown()
        _live_clients.add(self)

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
        _live_clients.discard(self)
        self.core.shutdown()


class SyncMPClient:
    """The engine cores (one per data-parallel rank) in their own processes, driven
    synchronously (offline LLM). Each request goes to the least-loaded core; the
    outputs of all cores come out of one get_outputs()."""

    def __init__(self, config: EngineConfig) -> None:
        self._ctx = make_context(zmq.Context)
        try:
            self.cores = start_cores(config, self._ctx)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self.core_num_blocks = [core.num_blocks for core in self.cores]
        self.num_blocks = sum(self.core_num_blocks)
        self._outs = [core.output_receiver(self._ctx) for core in self.cores]
        self._poller = zmq.Poller()
        for out in self._outs:
            self._poller.register(out.sock, zmq.POLLIN)
        self.balancer = LoadBalancer(len(self.cores))
        self._inbox: deque[tuple[int, CoreMessage]] = deque()  # received, not handed out
        self._call_ids = itertools.count(1)
        self._dead: str | None = None
        _live_clients.add(self)

    def add_request(self, req: EngineCoreRequest) -> None:
        core = self.balancer.pick()
        self._send(core, req)
        self.balancer.assign(core, [req.request_id])

    def abort(self, request_ids: list[str]) -> None:
        for core, ids in self.balancer.by_core(request_ids).items():
            self._send(core, AbortRequests(ids))

    def _send(self, core: int, msg: ClientMessage) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        self.cores[core].input.send(msg)

    def _next(self) -> tuple[int, CoreMessage]:
        """The next message of any core, with its core; EngineDeadError once one died."""
        while not self._inbox:
            self._check_alive()
            ready = dict(self._poller.poll(POLL_MS))
            # one message from every core that has one: no core waits behind another
            for core, out in enumerate(self._outs):
                if out.sock in ready:
                    self._inbox.append((core, out.recv()))
        core, msg = self._inbox.popleft()
        if isinstance(msg, EngineDead):
            self._dead = f"the engine died: {msg.reason}"
            raise EngineDeadError(self._dead)
        return core, msg

    def _check_alive(self) -> None:
        for core in self.cores:
            if not core.alive:
                self._dead = core.death_reason()
                raise EngineDeadError(self._dead)

    def get_outputs(self) -> EngineCoreOutputs:
        while True:
            core, msg = self._next()
            if isinstance(msg, EngineCoreOutputs):
                self._note(core, msg)
                return msg

    def _note(self, core: int, msg: EngineCoreOutputs) -> None:
        for o in msg.outputs:
            if o.finished:
                self.balancer.finished(o.request_id)
        if msg.stats is not None:
            self.balancer.report(core, msg.stats)

    def call_each(self, method: str, *args: Any) -> list[Any]:
        """A utility call in every engine core; their results in rank order."""
        call_id = next(self._call_ids)
        for core in range(len(self.cores)):
            self._send(core, UtilityCall(call_id, method, list(args)))
        results: dict[int, UtilityResult] = {}
        held: list[tuple[int, CoreMessage]] = []  # outputs that come meanwhile, kept in order
        while len(results) < len(self.cores):
            core, msg = self._next()
            if isinstance(msg, UtilityResult) and msg.call_id == call_id:
                results[core] = msg
            elif isinstance(msg, EngineCoreOutputs):
                held.append((core, msg))
        self._inbox.extendleft(reversed(held))
        for core, result in sorted(results.items()):
            if result.error is not None:
                label = self.cores[core].label
                raise RuntimeError(f"{method} failed in {label}: {result.error}")
        return [results[core].result for core in range(len(self.cores))]

    def call(self, method: str, *args: Any) -> Any:
        return combine_results(method, self.call_each(method, *args), self.core_num_blocks)

    def shutdown(self) -> None:
        _live_clients.discard(self)
        if self._ctx.closed:
            return
        stop_cores(self.cores)
        for out in self._outs:
            out.close()
        self._ctx.destroy(linger=0)


def make_sync_client(config: EngineConfig) -> InprocClient | SyncMPClient:
    """Multiprocess unless TESSERA_ENABLE_MULTIPROCESSING=0 (refused with data parallelism,
    whose every rank is an engine-core process). Under external_launcher the core always
    runs in the calling process: that process is the rank torchrun started, and its
    worker must be there too."""
    if config.parallel.distributed_executor_backend == "external_launcher":
        return InprocClient(config)
    if os.environ.get("TESSERA_ENABLE_MULTIPROCESSING", "1") == "0":
        dp = config.parallel.data_parallel_size
        if dp > 1:
            raise ConfigError(
                "TESSERA_ENABLE_MULTIPROCESSING",
                "0",
                f"--data-parallel-size={dp} runs one engine-core process per rank; "
                "unset TESSERA_ENABLE_MULTIPROCESSING or use --data-parallel-size=1",
            )
        return InprocClient(config)
    return SyncMPClient(config)
