"""--worker-cls, --worker-extension-cls and --max-parallel-loading-workers at TP=2 (gloo)."""

from __future__ import annotations

import asyncio

import pytest

from engine_core import LLM
from engine_core.args import EngineArgs
from engine_core.async_client import AsyncEngineClient
from engine_core.config import ConfigError, resolve_config
from tests.helpers.tiny_models import make_tiny_model

EXTENSION = "tests.helpers.worker_classes.ShardShapes"
TIMED_WORKER = "tests.helpers.worker_classes.LoadTimedWorker"
# Column parallel layers split their output rows, row parallel ones their input columns.
COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("llama-workers"), "llama"))


@pytest.fixture(scope="module")
def tp1_shapes(model) -> dict[str, list[int]]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    try:
        with LLM(
            model,
            max_model_len=256,
            distributed_executor_backend="uni",
            worker_extension_cls=EXTENSION,
        ) as llm:
            [shapes] = llm.collective_rpc("shard_shapes")
    finally:
        mp.undo()
    return shapes


@pytest.fixture(scope="module")
def tp2_llm(model):
    """TP=2 over mp workers, the core in this process; every option of this file at once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    llm = LLM(
        model,
        max_model_len=256,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        worker_cls=TIMED_WORKER,
        worker_extension_cls=EXTENSION,
        max_parallel_loading_workers=1,
    )
    try:
        yield llm
    finally:
        llm.shutdown()
        mp.undo()


def check_halved(tp1: dict[str, list[int]], ranks: list[dict[str, list[int]]]) -> None:
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    shard = ranks[0]
    assert set(shard) == set(tp1)
    checked = 0
    for name, full in tp1.items():
        if any(part in name for part in COLUMN_PARALLEL) and name.endswith("weight"):
            assert shard[name] == [full[0] // 2, full[1]], name
            checked += 1
        elif any(part in name for part in ROW_PARALLEL) and name.endswith("weight"):
            assert shard[name] == [full[0], full[1] // 2], name
            checked += 1
        elif "norm" in name:
            assert shard[name] == full, name  # replicated
    assert checked == 4 * 2  # four sharded matrices in each of the two layers


@pytest.mark.slow
def test_extension_reports_shards_from_llm(tp1_shapes, tp2_llm):
    check_halved(tp1_shapes, tp2_llm.collective_rpc("shard_shapes"))
    assert tp2_llm.collective_rpc("rank_of_worker") == [0, 1]


@pytest.mark.slow
def test_one_loading_worker_loads_ranks_in_turn(tp2_llm):
    (start0, end0), (start1, end1) = tp2_llm.collective_rpc("load_interval")
    assert start0 < end0 <= start1 < end1  # rank 1 starts after rank 0 is done


@pytest.mark.slow
def test_extension_reports_shards_from_async_client(model, tp1_shapes):
    async def run() -> list:
        config = resolve_config(
            EngineArgs(
                model=model,
                max_model_len=256,
                tensor_parallel_size=2,
                distributed_executor_backend="mp",
                worker_extension_cls=EXTENSION,
            )
        )
        client = await AsyncEngineClient.start(config, None)
        try:
            return await client.collective_rpc("shard_shapes")
        finally:
            await client.shutdown()

    check_halved(tp1_shapes, asyncio.run(run()))


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("worker_extension_cls", "no_such_module.Ext", "cannot import no_such_module"),
        ("worker_extension_cls", "tests.helpers.worker_classes.Nope", "has no Nope"),
        ("worker_extension_cls", "Ext", "not a qualified class name"),
        ("worker_extension_cls", "tests.helpers.worker_classes.ReplacesExecute", "'execute'"),
        ("worker_cls", "no_such_module.W", "cannot import no_such_module"),
        ("worker_cls", "tests.helpers.worker_classes.NotAWorker", "must subclass"),
    ],
)
def test_unusable_classes_are_refused_by_name(model, name, value, reason):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag}={value}: .*{reason}"):
        resolve_config(EngineArgs(model=model, **{name: value}))


def test_loading_workers_must_be_positive(model):
    with pytest.raises(ConfigError, match="--max-parallel-loading-workers=0"):
        resolve_config(EngineArgs(model=model, max_parallel_loading_workers=0))
