"""Data parallelism: the routing policy, the merging of results, and DP=2 engines."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from engine_core import LLM, SamplingParams
from engine_core.args import EngineArgs
from engine_core.async_client import AsyncEngineClient
from engine_core.client import EngineDeadError, make_sync_client
from engine_core.config import ConfigError, resolve_config
from engine_core.dp import LoadBalancer, combine_results, rank_configs, total_stats
from engine_core.messages import SchedulerStats
from engine_core.sampling_params import RequestOutputKind
from engine_core.tokenizer import Tokenizer
from tests.engine_core.test_processes import assert_no_children, prompts
from tests.helpers.generate import GREEDY, token_ids
from tests.helpers.processes import children
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("llama-dp"), "llama"))


# ---- the routing policy -----------------------------------------------------------------


def send(balancer: LoadBalancer, request_id: str) -> int:
    core = balancer.pick()
    balancer.assign(core, [request_id])
    return core


def test_a_burst_spreads_before_any_stats_come():
    balancer = LoadBalancer(2)
    cores = [send(balancer, f"r{i}") for i in range(16)]
    assert cores.count(0) == cores.count(1) == 8


def test_idle_cores_take_turns():
    balancer = LoadBalancer(3)
    cores = []
    for i in range(6):
        cores.append(send(balancer, f"r{i}"))
        balancer.finished(f"r{i}")  # each ends before the next arrives
    assert cores == [0, 1, 2, 0, 1, 2]


def test_waiting_requests_weigh_more_than_running_ones():
    balancer = LoadBalancer(2)
    balancer.assign(0, ["a0", "a1", "a2", "a3"])  # 4 on core 0, 3 of them waiting
    balancer.assign(1, [f"b{i}" for i in range(6)])  # 6 on core 1, all running
    balancer.report(0, SchedulerStats(num_running=1, num_waiting=3))
    balancer.report(1, SchedulerStats(num_running=6, num_waiting=0))
    assert balancer.score(0) == 1 + 3 * 4 and balancer.score(1) == 6
    assert balancer.pick() == 1


def test_a_stale_waiting_count_never_outweighs_what_is_left():
    balancer = LoadBalancer(2)
    balancer.assign(0, ["a"])
    balancer.report(0, SchedulerStats(num_waiting=5))  # reported before 4 of them ended
    assert balancer.score(0) == 4  # one request, counted as waiting


def test_finished_requests_and_aborts_find_their_core():
    balancer = LoadBalancer(2)
    balancer.assign(0, ["a-0", "a-1"])  # one request with n=2: one core
    balancer.assign(1, ["b"])
    assert balancer.by_core(["a-1", "b", "gone"]) == {0: ["a-1"], 1: ["b"]}
    balancer.finished("a-0")
    balancer.finished("a-0")  # reported twice (abort after finish): counted once
    balancer.finished("unknown")
    assert [balancer.num_unfinished(c) for c in (0, 1)] == [1, 1]
    assert balancer.core_of("a-0") is None and balancer.core_of("a-1") == 0


def test_utility_results_combine():
    blocks = [100, 300]
    assert combine_results("collective_rpc", [["w0"], ["w1"]], blocks) == ["w0", "w1"]
    assert combine_results("reset_prefix_cache", [True, False], blocks) is False
    assert combine_results("check_health", [None, None], blocks) is None
    assert combine_results("get_stats", [{"num_running": 3}], [100]) == {"num_running": 3}
    stats = combine_results(
        "get_stats",
        [
            {"num_running": 1, "num_waiting": 2, "kv_cache_usage": 0.5, "prefix_cache_hits": 4},
            {"num_running": 3, "num_waiting": 0, "kv_cache_usage": 0.1, "prefix_cache_hits": 1},
        ],
        blocks,
    )
    assert (stats["num_running"], stats["num_waiting"], stats["prefix_cache_hits"]) == (4, 2, 5)
    assert stats["kv_cache_usage"] == pytest.approx((0.5 * 100 + 0.1 * 300) / 400)
    one = SchedulerStats(num_running=2)
    assert total_stats([one], [7]) is one


# ---- the config -------------------------------------------------------------------------


def test_each_rank_gets_its_own_devices(model):
    config = resolve_config(
        EngineArgs(model=model, max_model_len=256, data_parallel_size=3, tensor_parallel_size=2)
    )
    ranks = rank_configs(config)
    assert [c.parallel.data_parallel_rank for c in ranks] == [0, 1, 2]
    assert [c.parallel.first_device for c in ranks] == [0, 2, 4]
    assert all(c.model == config.model and c.cache == config.cache for c in ranks)


def test_too_few_gpus_for_dp_x_tp_is_refused(model, monkeypatch):
    monkeypatch.setattr("engine_core.config.cuda_device_count", lambda: 2)
    args = dict(model=model, max_model_len=256, device="cuda")
    with pytest.raises(ConfigError) as error:
        resolve_config(EngineArgs(**args, data_parallel_size=2, tensor_parallel_size=2))
    assert error.value.arg_name == "--data-parallel-size"
    assert "need 4 GPUs; only 2 are visible" in str(error.value)
    config = resolve_config(EngineArgs(**args, data_parallel_size=2))
    assert config.parallel.data_parallel_size == 2


def test_expert_parallel_is_refused_with_its_reason(model):
    with pytest.raises(ConfigError, match="no MoE architecture is supported"):
        resolve_config(EngineArgs(model=model, enable_expert_parallel=True))


def test_in_process_engine_refuses_dp(model, monkeypatch):
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    config = resolve_config(EngineArgs(model=model, max_model_len=256, data_parallel_size=2))
    with pytest.raises(ConfigError, match="--data-parallel-size=2 runs one engine-core"):
        make_sync_client(config)


# ---- engines ----------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_dp2_equals_dp1(model, monkeypatch):
    ps = prompts(10, seed=4)
    greedy = SamplingParams(max_tokens=8, **GREEDY)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "1")
    with LLM(model, max_model_len=256, data_parallel_size=2) as llm:
        assert len(children()) == 4  # two engine cores, each with its worker
        picks: list[int] = []
        assign = llm.engine.balancer.assign
        llm.engine.balancer.assign = lambda core, ids: (picks.append(core), assign(core, ids))
        dp2 = token_ids(llm.generate(ps, greedy, use_tqdm=False))
        dp2_seeded = token_ids(llm.generate(ps, seeded, use_tqdm=False))
        assert len(llm.collective_rpc("check_health")) == 2  # one worker on each core
        assert llm.reset_prefix_cache() is True
    assert sorted(set(picks)) == [0, 1]
    assert_no_children()
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    with LLM(model, max_model_len=256, distributed_executor_backend="uni") as llm:
        dp1 = token_ids(llm.generate(ps, greedy, use_tqdm=False))
        dp1_seeded = token_ids(llm.generate(ps, seeded, use_tqdm=False))
    assert dp2 == dp1
    assert dp2_seeded == dp1_seeded  # a seeded request samples alike on any core


@pytest.mark.slow
def test_kill_9_of_one_core_fails_its_requests_only(model):
    async def run() -> None:
        config = resolve_config(EngineArgs(model=model, max_model_len=256, data_parallel_size=2))
        tokenizer = Tokenizer.load(config.model.tokenizer)
        client = await AsyncEngineClient.start(config, tokenizer)
        ipc_dirs = [core.ipc.path for core in client._cores]
        on_core: dict[str, int] = {}  # request id -> its core, once it streams
        tasks: dict[str, asyncio.Task] = {}

        async def collect(prompt, max_tokens: int, request_id: str) -> list:
            params = SamplingParams(
                max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, **GREEDY
            )
            outs = []
            async for out in client.generate(prompt, params, request_id):
                on_core.setdefault(request_id, client._core_of[request_id])
                outs.append(out)
            return outs

        async def all_streaming() -> None:
            while len(on_core) < len(tasks):
                await asyncio.sleep(0.05)

        try:
            # idle cores take turns: k0, k2, k4 go to core 0 (short), the others to core 1
            for i, p in enumerate(prompts(6, seed=5)):
                rid = f"k{i}"
                tasks[rid] = asyncio.create_task(collect(p, 200 if i % 2 else 16, rid))
            await asyncio.wait_for(all_streaming(), 60)
            assert [on_core[f"k{i}"] for i in (1, 3, 5)] == [1, 1, 1]
            os.kill(client._cores[1].proc.pid, signal.SIGKILL)
            done, pending = await asyncio.wait(tasks.values(), timeout=60)
            assert not pending
            for rid, task in tasks.items():
                if on_core[rid] == 1:
                    assert isinstance(task.exception(), EngineDeadError), rid
                    assert "data-parallel rank 1" in str(task.exception())
                else:  # the healthy core's requests run to their end
                    assert task.result()[-1].finished, rid
            assert client.errored
            with pytest.raises(EngineDeadError):
                await collect([5, 6, 7], 4, "after")
        finally:
            for task in tasks.values():
                task.cancel()
            await client.shutdown()
        assert not any(os.path.exists(path) for path in ipc_dirs)

    asyncio.run(run())
    assert_no_children()


def test_dp_config_round_trips(model):
    config = resolve_config(EngineArgs(model=model, max_model_len=256, data_parallel_size=2))
    rank1 = rank_configs(config)[1]
    assert type(rank1).decode(rank1.encode()) == rank1
