"""Tensor parallelism on the CPU (gloo): TP=2 gives the greedy tokens of TP=1."""

from __future__ import annotations

import random

import pytest

from engine_core import LLM, SamplingParams
from engine_core.args import EngineArgs
from engine_core.config import ConfigError, resolve_config
from tests.helpers.tiny_models import TINY_ARCHS, make_tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(10, 5000) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def greedy(path: str, tp: int, ps, monkeypatch) -> list[list[int]]:
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")  # the core here, workers apart
    with LLM(
        path, max_model_len=256, tensor_parallel_size=tp, distributed_executor_backend="mp"
    ) as llm:
        outs = llm.generate(ps, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
        if tp > 1:
            shapes = llm.collective_rpc("kv_cache_dtype_name")
            assert len(shapes) == tp  # one answer per rank
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tp2_equals_tp1(arch, tmp_path, monkeypatch):
    path = str(make_tiny_model(tmp_path / arch, arch))
    ps = prompts(4, seed=3)
    assert greedy(path, 2, ps, monkeypatch) == greedy(path, 1, ps, monkeypatch)


def test_tp_must_split_the_heads(tmp_path):
    path = str(make_tiny_model(tmp_path / "llama", "llama"))  # 4 heads
    with pytest.raises(ConfigError, match="tensor-parallel-size=3"):
        resolve_config(EngineArgs(model=path, tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="distributed-executor-backend=uni"):
        resolve_config(
            EngineArgs(model=path, tensor_parallel_size=2, distributed_executor_backend="uni")
        )
