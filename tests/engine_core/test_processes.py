"""The process split: engine core and worker in their own processes, over ZMQ."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import msgspec
import psutil
import pytest

from engine_core import LLM, SamplingParams
from engine_core.args import EngineArgs
from engine_core.async_client import AsyncEngineClient
from engine_core.client import EngineDeadError
from engine_core.config import resolve_config
from engine_core.messages import AbortRequests, EngineCoreRequest, UtilityCall
from engine_core.sampling_params import RequestOutputKind
from engine_core.tokenizer import Tokenizer
from executor.messages import SamplingOptions
from tests.helpers.generate import GREEDY, random_prompts, token_ids
from tests.helpers.processes import children
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("llama-proc"), "llama"))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return random_prompts(n, (2, 40), seed)


def assert_no_children(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children() == []


@pytest.mark.slow
def test_mp_equals_in_process(model, monkeypatch):
    ps = prompts(6)
    params = SamplingParams(max_tokens=12, **GREEDY)
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "1")
    with LLM(model, max_model_len=256, distributed_executor_backend="mp") as llm:
        names = sorted(p.name() for p in children())
        mp = token_ids(llm.generate(ps, params))
    assert len(names) == 2  # the engine core and its worker
    assert_no_children()
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    with LLM(model, max_model_len=256, distributed_executor_backend="uni") as llm:
        inproc = token_ids(llm.generate(ps, params))
    assert mp == inproc


async def _start(model: str, **kw) -> AsyncEngineClient:
    config = resolve_config(EngineArgs(model=model, max_model_len=256, **kw))
    tokenizer = Tokenizer.load(config.model.tokenizer)
    return await AsyncEngineClient.start(config, tokenizer)


async def _collect(client, prompt, params, rid, abort_after=None):
    n = 0
    outs = []
    async for out in client.generate(prompt, params, rid):
        outs.append(out)
        n += 1
        if abort_after is not None and n >= abort_after:
            break  # leaving the stream aborts the request
    return outs


@pytest.mark.slow
def test_300_concurrent_requests_end_exactly_once(model):
    async def run():
        client = await _start(model, distributed_executor_backend="mp")
        try:
            rng = random.Random(1)
            tasks = []
            for i, p in enumerate(prompts(300, seed=2)):
                params = SamplingParams(
                    max_tokens=rng.randint(1, 24),
                    n=rng.choice([1, 1, 2]),
                    stop=["e"] if i % 7 == 0 else None,
                    output_kind=RequestOutputKind.DELTA,
                    **GREEDY,
                )
                abort = 2 if i % 10 == 0 else None
                tasks.append(_collect(client, p, params, f"req-{i}", abort))
            results = await asyncio.gather(*tasks)
            for i, outs in enumerate(results):
                if i % 10 != 0:
                    assert sum(o.finished for o in outs) == 1, i
                    assert outs[-1].finished
            await asyncio.sleep(0.5)
            stats = await client.call("get_stats")
            assert stats["num_running"] == 0 and stats["num_waiting"] == 0
            assert stats["kv_cache_usage"] == 0.0
            assert client.num_unfinished() == 0
        finally:
            await client.shutdown()

    asyncio.run(run())
    assert_no_children()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["worker", "core"])
def test_kill_9_reaches_every_waiting_request(model, victim):
    async def run():
        client = await _start(model, distributed_executor_backend="mp")
        try:
            params = SamplingParams(max_tokens=200, output_kind=RequestOutputKind.DELTA, **GREEDY)
            tasks = [
                asyncio.create_task(_collect(client, p, params, f"k{i}"))
                for i, p in enumerate(prompts(8, seed=3))
            ]
            await asyncio.sleep(1.0)
            core = client._cores[0].proc.pid
            target = core if victim == "core" else psutil.Process(core).children()[0].pid
            os.kill(target, signal.SIGKILL)
            t0 = time.monotonic()
            done, pending = await asyncio.wait(tasks, timeout=5)
            assert not pending, "requests still waiting 5 s after the kill"
            assert time.monotonic() - t0 < 5
            for t in done:
                assert isinstance(t.exception(), EngineDeadError)
            assert client.errored
        finally:
            ipc = client._cores[0].ipc.path
            await client.shutdown()
        assert not os.path.exists(ipc)  # socket files of the core and the workers too

    asyncio.run(run())
    assert_no_children()


@pytest.mark.slow
def test_kill_9_of_rank_1_takes_the_engine_down(model):
    """TP=2: rank 0 may sit in a collective with the dead rank; the engine core must
    still fail every request at once and end itself and rank 0."""

    async def run():
        client = await _start(
            model,
            distributed_executor_backend="mp",
            tensor_parallel_size=2,
            worker_extension_cls="tests.helpers.worker_classes.ProcessId",
        )
        try:
            rank_pids = await client.collective_rpc("process_id")
            params = SamplingParams(max_tokens=200, output_kind=RequestOutputKind.DELTA, **GREEDY)
            tasks = [
                asyncio.create_task(_collect(client, p, params, f"r{i}"))
                for i, p in enumerate(prompts(8, seed=4))
            ]
            await asyncio.sleep(1.0)
            assert not any(t.done() for t in tasks), "generation ended before the kill"
            engine = [psutil.Process(client._cores[0].proc.pid), psutil.Process(rank_pids[0])]
            os.kill(rank_pids[1], signal.SIGKILL)
            done, pending = await asyncio.wait(tasks, timeout=5)
            assert not pending, "requests still waiting 5 s after the kill"
            for t in done:
                assert isinstance(t.exception(), EngineDeadError)
            assert client.errored
            # the engine ends itself: the core and the surviving rank exit unasked
            _, alive = await asyncio.to_thread(psutil.wait_procs, engine, 15)
            assert alive == []
        finally:
            ipc = client._cores[0].ipc.path
            await client.shutdown()
        assert not os.path.exists(ipc)

    asyncio.run(run())
    assert_no_children()


def test_message_round_trips():
    enc = msgspec.msgpack.Encoder()
    from engine_core.messages import (
        ClientMessage,
        CoreMessage,
        EngineCoreOutput,
        EngineCoreOutputs,
        EngineDead,
        FinishReason,
        SchedulerStats,
        UtilityResult,
    )
    from executor.messages import (
        FromWorker,
        Logprobs,
        NewRequest,
        RunningRequest,
        StepInput,
        StepOutput,
        ToWorker,
        WorkerHello,
        WorkerReady,
        WorkerRpc,
        WorkerRpcResult,
        WorkerShutdown,
    )

    opts = SamplingOptions(temperature=0.5, seed=3, logit_bias={5: -1.0}, stop_token_ids=[2])
    lp = Logprobs([[1, 2]], [[-0.1, -2.0]], [1])
    client_msgs = [
        EngineCoreRequest("a", [1, 2, 3], opts, 7, [2], True, 1.5, 3),
        AbortRequests(["a", "b"]),
        UtilityCall(4, "reset_prefix_cache", []),
    ]
    core_msgs = [
        EngineCoreOutputs(
            [EngineCoreOutput("a", [9], lp, None, FinishReason.STOP, 2, 16)],
            SchedulerStats(1, 2, 0.5, 10, 4, 0, 33),
            12.0,
        ),
        UtilityResult(4, {"x": [1]}),
        EngineDead("boom"),
    ]
    to_worker = [
        StepInput(
            1,
            [NewRequest("a", [1, 2], 2, [3], 0, opts)],
            [RunningRequest("b", [4], 10, True)],
            {"a": 2, "b": 1},
            ["c"],
            ["d"],
        ),
        WorkerRpc(1, "ping", [1]),
        WorkerShutdown(),
    ]
    from_worker = [
        StepOutput(1, ["a"], [[5]], {"a": lp}, {"a": lp}),
        WorkerHello(0, 123),
        WorkerReady(0, 100),
        WorkerRpcResult(1, 0, [1, 2]),
    ]
    for msgs, typ in (
        (client_msgs, ClientMessage),
        (core_msgs, CoreMessage),
        (to_worker, ToWorker),
        (from_worker, FromWorker),
    ):
        for m in msgs:
            assert msgspec.msgpack.decode(enc.encode(m), type=typ) == m


@pytest.mark.slow
def test_malformed_frame_is_dropped_not_fatal(model):
    async def run():
        client = await _start(model, distributed_executor_backend="mp")
        try:
            client._cores[0].input.send_bytes(b"\xc1 not msgpack")
            client._cores[0].input.send_bytes(msgspec.msgpack.encode(["Nope", 1]))
            params = SamplingParams(
                max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY, **GREEDY
            )
            outs = await _collect(client, [11, 12, 13], params, "after")
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
        finally:
            await client.shutdown()

    asyncio.run(run())
    assert_no_children()


@pytest.mark.parametrize("in_process_core", [True, False])
def test_a_script_that_never_shuts_down_exits_cleanly(tmp_path, in_process_core):
    # No LLM.shutdown(): the exit hook stops the engine and its worker processes (the
    # in-process core's mp workers used to be joined forever), and nothing is left for
    # the resource tracker to report (the workers' progress-bar semaphore was).
    import subprocess
    import sys

    model = make_tiny_model(tmp_path / "llama", "llama")
    script = (
        "from engine_core import LLM, SamplingParams\n"
        f"llm = LLM({str(model)!r}, max_model_len=128)\n"
        "llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)\n"
    )
    env = {**os.environ, "TESSERA_ENABLE_MULTIPROCESSING": "0" if in_process_core else "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "leaked" not in result.stderr, result.stderr[-2000:]
