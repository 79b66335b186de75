"""The kernel warm-up before the first request: every attention tile, nothing written."""

from __future__ import annotations

import pytest

from engine_core import LLM
from executor.loader.kv_scales import attention_layers
from executor.warmup import warm_up_prefill
from kernels.attention import _tile_config, query_launches, tile_query_lens
from kernels.dispatch import next_pow2
from tests.helpers.tiny_models import make_tiny_model


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 4), (16, 4), (32, 8), (16, 1), (64, 1)])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 16), (256, 16), (128, 128)])
def test_the_warm_up_lengths_reach_every_tile_a_step_can_take(
    heads, kv_heads, head_dim, block_size
) -> None:
    group = next_pow2(heads // kv_heads)
    block_d = max(16, next_pow2(head_dim))

    def tiles(max_query_len: int) -> set[tuple[int, int, int, int]]:
        launches = query_launches(max_query_len, group)
        return {_tile_config(rows, group, block_d, block_size) for _, _, rows in launches}

    every = set().union(*(tiles(q) for q in range(1, 700)))
    warmed = set().union(*(tiles(q) for q in tile_query_lens(heads, kv_heads)))
    assert warmed == every


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")


def test_the_warm_up_runs_each_length_and_leaves_the_cache_and_scales_alone(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama")  # 4 heads over 2 KV heads: group 2
    with LLM(str(model_dir), max_model_len=128, distributed_executor_backend="uni") as llm:
        runner = llm.engine.core.executor.worker.runner
        for cache in runner.kv_caches:
            cache.fill_(7.0)
        layers = attention_layers(runner.model)
        for a in layers:
            a.calculate_scales = True
        seen: list[int] = []
        hook = runner.model.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
        try:
            warm_up_prefill(runner, limit=32)
        finally:
            hook.remove()
        assert tile_query_lens(4, 2) == [8, 32, 33]
        assert seen == [8, 32]  # 33 is over the limit
        assert all(bool((c == 7.0).all()) for c in runner.kv_caches)
        assert all(a.calculate_scales for a in layers)
        assert all(a.k_scale == 1.0 for a in layers)
