"""The `mp` executor: one spawned worker process per device.

Steps and RPCs go to all workers at once over one ZMQ XPUB socket (XPUB, so that the
executor sees every worker's subscription before the first broadcast: no message is
lost to ZMQ's slow-joiner window). Results come back on one PULL socket; only the
output rank (the first of the last pipeline stage) answers steps, and since every
worker takes steps in broadcast order, outputs come back in the order steps were
submitted. With pipeline parallelism several steps are in flight (`submit` /
`collect`); step outputs that arrive while an RPC waits are kept for `collect`. A
monitor thread watches the process sentinels and reports a dead worker within a
fraction of a second.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from executor.base import Executor
from executor.ipc import IpcDir, Receiver, Sender, make_context, spawn_process
from executor.messages import (
    FromWorker,
    StepInput,
    StepOutput,
    ToWorker,
    WorkerHello,
    WorkerReady,
    WorkerRpc,
    WorkerRpcResult,
    WorkerShutdown,
)
from executor.worker_proc import WorkerAddresses, worker_main

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0
POLL_MS = 100


class WorkerDiedError(RuntimeError):
    pass


class MpExecutor(Executor):
    overlaps_steps = True
    on_worker_death: Callable[[str], None] | None = None

    def initialize(self) -> int:
        self.world_size = self.config.parallel.world_size
        self._ipc = IpcDir()
        self._ctx = make_context(zmq.Context)
        self._dead: str | None = None
        self._call_ids = 0
        addrs = WorkerAddresses(
            self._ipc.address("hs"),
            self._ipc.address("bcast"),
            self._ipc.address("res"),
            "file://" + self._ipc.address("dist").removeprefix("ipc://"),
        )
        self._bcast: Sender[ToWorker] = Sender(self._ctx, zmq.XPUB, addrs.broadcast, bind=True)
        # every worker's subscription must reach us, not only the first of a topic
        self._bcast.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._results: Receiver[FromWorker] = Receiver(
            self._ctx, zmq.PULL, addrs.results, True, FromWorker
        )
        self._handshake = self._ctx.socket(zmq.ROUTER)
        self._handshake.setsockopt(zmq.LINGER, 0)
        self._handshake.bind(addrs.handshake)
        self._procs = self._spawn(addrs)
        self._send_config()
        num_blocks = self._await_ready()
        self._await_subscriptions()
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="worker-monitor")
        self._monitor.start()
        self.collective_rpc("init_cache", (num_blocks,))
        return num_blocks

    def _spawn(self, addrs: WorkerAddresses) -> list[Any]:
        level = logging.getLogger().getEffectiveLevel()
        return [
            spawn_process(worker_main, (rank, rank, addrs, level), f"tessera-worker{rank}")
            for rank in range(self.world_size)
        ]

    def _deadline_wait(self, sock: zmq.Socket, what: str, deadline: float) -> None:
        while not sock.poll(POLL_MS):
            self._raise_if_dead()
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not {what} within {STARTUP_TIMEOUT_S:.0f} s")

    def _send_config(self) -> None:
        data = self.config.encode()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for _ in range(self.world_size):
            self._deadline_wait(self._handshake, "say hello", deadline)
            ident, raw = self._handshake.recv_multipart()
            hello = msgspec.msgpack.decode(raw, type=WorkerHello)
            logger.debug("worker %d (pid %d) says hello", hello.rank, hello.pid)
            self._handshake.send_multipart([ident, data])

    def _await_ready(self) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        blocks: list[int] = []
        while len(blocks) < self.world_size:
            self._deadline_wait(self._results.sock, "load the model", deadline)
            msg = self._results.recv()
            if isinstance(msg, WorkerReady):
                if msg.error is not None:
                    raise RuntimeError(f"worker {msg.rank} failed to start:\n{msg.error}")
                blocks.append(msg.num_blocks)
        return min(blocks)

    def _await_subscriptions(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for _ in range(self.world_size):
            self._deadline_wait(self._bcast.sock, "subscribe", deadline)
            self._bcast.sock.recv()  # b"\x01": one subscription

    # ---- liveness -----------------------------------------------------------------
    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self._procs}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._dead is not None or getattr(self, "_closing", False):
            return
        proc = sentinels[ready[0]]  # type: ignore[index]
        proc.join(timeout=1)  # reap it, so that its exit code is known
        self._dead = (
            f"worker process {proc.name} (pid {proc.pid}) died with exit code {proc.exitcode}"
        )
        logger.error(self._dead)
        if self.on_worker_death is not None:
            self.on_worker_death(self._dead)

    def _raise_if_dead(self) -> None:
        if self._dead is None:
            for p in self._procs:
                if not p.is_alive():
                    self._dead = f"worker process {p.name} died with exit code {p.exitcode}"
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    # ---- the interface ------------------------------------------------------------
    def execute(self, step: StepInput) -> StepOutput:
        self.submit(step)
        return self.collect()

    def submit(self, step: StepInput) -> None:
        self._bcast.send(step)

    def collect(self) -> StepOutput:
        if self._done:
            return self._done.popleft()
        while True:
            msg = self._recv()
            if isinstance(msg, StepOutput):
                return msg

    def _recv(self) -> Any:
        while not self._results.sock.poll(POLL_MS):
            self._raise_if_dead()
        try:
            return self._results.recv()
        except msgspec.DecodeError:
            logger.exception("malformed worker message dropped")
            return None

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self._call_ids += 1
        call_id = self._call_ids
        self._bcast.send(WorkerRpc(call_id, method, list(args)))
        results: dict[int, WorkerRpcResult] = {}
        while len(results) < self.world_size:
            msg = self._recv()
            if isinstance(msg, WorkerRpcResult) and msg.call_id == call_id:
                results[msg.rank] = msg
            elif isinstance(msg, StepOutput):
                self._done.append(msg)  # a step in flight finished first: keep it
        errors = [f"rank {r.rank}: {r.error}" for r in results.values() if r.error]
        if errors:
            raise RuntimeError(f"collective_rpc({method}) failed: " + "; ".join(errors))
        return [results[r].result for r in range(self.world_size)]

    def check_health(self) -> None:
        self._raise_if_dead()

    def shutdown(self) -> None:
        self._closing = True
        if not hasattr(self, "_procs"):
            return
        # After a rank died the others may wait forever in a collective with it (NCCL
        # never notices a dead peer): they get no grace period.
        grace_s = 0.0 if self._dead is not None else 5.0
        try:
            self._bcast.send(WorkerShutdown())
        except zmq.ZMQError:
            pass
        for p in self._procs:
            p.join(timeout=grace_s)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._ctx.destroy(linger=0)
        self._ipc.close()
