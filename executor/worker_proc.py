"""The worker process of the `mp` executor: one per device.

It says hello, receives the encoded EngineConfig once, loads the model, reports how
many KV blocks fit, then serves broadcast messages (steps, RPCs) until shutdown.
Only the output rank (the first of the last pipeline stage) answers steps, other
ranks only with an error; every rank answers RPCs. `run_step` and `run_rpc` are
shared with the Ray actor (`executor/ray_worker.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from executor import step_trace
from executor.config import EngineConfig
from executor.heap import freeze_startup_heap, thaw_heap
from executor.ipc import Receiver, Sender, die_with_parent
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

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_MS = 60_000


class WorkerAddresses(msgspec.Struct, frozen=True):
    handshake: str  # DEALER -> the executor's ROUTER: hello, then the config bytes
    broadcast: str  # SUB <- the executor's XPUB: steps and RPCs
    results: str  # PUSH -> the executor's PULL
    dist_init: str  # torch.distributed init method (a file in the ipc folder)


def worker_main(rank: int, local_rank: int, addrs: WorkerAddresses, log_level: int) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine core decides when we stop
    _thread_lock_for_progress_bars()
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker{rank} %(levelname)s %(message)s"
    )
    ctx = zmq.Context()
    results: Sender[FromWorker] = Sender(ctx, zmq.PUSH, addrs.results, bind=False)
    try:
        config = _receive_config(ctx, addrs.handshake, rank)
        sub: Receiver[ToWorker] = Receiver(ctx, zmq.SUB, addrs.broadcast, False, ToWorker)
        worker = _start_worker(config, rank, local_rank, addrs.dist_init, results)
        if worker is not None:
            step_trace.start()
            try:
                _serve(worker, rank, sub, results)
            finally:
                step_trace.dump(f"worker{rank}")
                worker.shutdown()
    finally:
        thaw_heap()
        ctx.destroy(linger=0)


def _receive_config(ctx: zmq.Context, addr: str, rank: int) -> EngineConfig:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sock.send(msgspec.msgpack.encode(WorkerHello(rank, os.getpid())))
    if not sock.poll(HANDSHAKE_TIMEOUT_MS):
        raise TimeoutError(f"worker {rank}: no config from the engine core")
    data = sock.recv()
    sock.close()
    return EngineConfig.decode(data)


def _start_worker(
    config: EngineConfig, rank: int, local_rank: int, dist_init: str, results: Sender
) -> Any:
    from executor.worker import make_worker

    try:
        worker = make_worker(config, rank, local_rank, dist_init)
        worker.load_model()
        results.send(WorkerReady(rank, worker.determine_num_blocks()))
        return worker
    except Exception:
        results.send(WorkerReady(rank, error=traceback.format_exc()))
        return None


def _serve(worker: Any, rank: int, sub: Receiver, results: Sender) -> None:
    """Serve broadcast messages until shutdown.

    A step is launched (queued on the device) and answered once the next message has
    come and its forward been launched, or once the device is done with it and no
    message came: the device then never waits for the host between steps (the engine
    core keeps the next step queued here; see executor/model_runner.py).
    """
    pending: Any = None  # the launched step not answered yet
    overlap = getattr(worker, "overlaps_steps", False)
    while True:
        if pending is not None and not _next_message_or_done(sub, pending):
            _answer_pending(worker, results, pending)
            pending = None
        try:
            msg = sub.recv()
        except msgspec.DecodeError:
            logger.exception("malformed message dropped")
            continue
        if isinstance(msg, StepInput) and overlap:
            pending = _launch_overlapped(worker, results, msg, pending)
            continue
        _answer_pending(worker, results, pending)  # everything else waits for it
        pending = None
        if isinstance(msg, StepInput):
            _answer(worker, results, run_step(worker, msg))
        elif isinstance(msg, WorkerRpc):
            results.send(run_rpc(worker, rank, msg))
            if msg.method == "init_cache":  # the last step of startup
                freeze_startup_heap(f"worker {rank}")
        elif isinstance(msg, WorkerShutdown):
            return


def _launch_overlapped(worker: Any, results: Sender, step: StepInput, pending: Any) -> Any:
    """Launch `step` while the step before it runs; answer that one in between.

    The step before is finished and answered once this one's forward is queued, before
    its sampling is: the engine core then schedules the next step while this worker
    queues the sampling, not after. (On W2's short tail steps the host's round trip had
    outlasted the device's step.) Returns the launched step; its `launch` trace span
    holds the step before's `finish` and `answer`.
    """
    answered = False

    def answer_before() -> None:
        nonlocal answered
        answered = True
        _answer_pending(worker, results, pending)

    t0 = step_trace.now()
    launched = _guarded(step.step_id, functools.partial(worker.launch, step, answer_before))
    step_trace.span("launch", step.step_id, t0)
    if not answered:  # this step samples nothing, or failed before its sampling
        _answer_pending(worker, results, pending)
    return launched


def _next_message_or_done(sub: Receiver, launched: Any) -> bool:
    """Wait until a message is there (True) or the launched step is done (False)."""
    if isinstance(launched, StepOutput):
        return False  # it failed to launch: nothing to wait for
    while not launched.ready():
        if sub.sock.poll(0):
            return True
    return bool(sub.sock.poll(0))


def _answer_pending(worker: Any, results: Sender, pending: Any) -> None:
    """Finish the launched step, if there is one, and answer it."""
    if pending is None:
        return
    out = pending
    if not isinstance(pending, StepOutput):  # else it failed to launch: its error output
        t0 = step_trace.now()
        out = _guarded(pending.step.step_id, functools.partial(worker.finish, pending))
        step_trace.span("finish", out.step_id, t0)
    _answer(worker, results, out)


def _answer(worker: Any, results: Sender, out: StepOutput) -> None:
    if worker.answers_steps or out.error is not None:
        t0 = step_trace.now()
        results.send(out)
        step_trace.span("answer", out.step_id, t0)


def _guarded(step_id: int, call: Callable[[], Any]) -> Any:
    """call()'s result, or the step's error output when it raised."""
    try:
        return call()
    except Exception:
        logger.exception("step %d failed", step_id)
        return StepOutput(step_id, error=traceback.format_exc())


def run_step(worker: Any, step: StepInput) -> StepOutput:
    t0 = step_trace.now()
    out = _guarded(step.step_id, functools.partial(worker.execute, step))
    step_trace.span("run", step.step_id, t0)
    return out


def run_rpc(worker: Any, rank: int, call: WorkerRpc) -> WorkerRpcResult:
    try:
        result = getattr(worker, call.method)(*call.args)
        msgspec.msgpack.encode(result)  # fail here, not in the sender, if it can't travel
        return WorkerRpcResult(call.call_id, rank, result)
    except Exception as e:
        return WorkerRpcResult(call.call_id, rank, error=f"{type(e).__name__}: {e}")


def _thread_lock_for_progress_bars() -> None:
    # tqdm's default lock (the weight loaders' progress bars) is a named
    # multiprocessing semaphore, which a worker killed at shutdown never unlinks: the
    # resource tracker then warns of a leak. This process shares no bars with others.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
