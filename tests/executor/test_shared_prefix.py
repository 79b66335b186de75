"""Cascade attention: finding the prefix a decode step's contexts share, its graph
sizes, and the engine's tokens with it on (kernels interpreted on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest

import kernels.attention
import kernels.skinny_gemm
from engine_core import LLM, SamplingParams
from executor.cuda_graphs import capture_sizes, cascade_sizes
from executor.shared_prefix import shared_prefix_len
from kernels.dispatch import interpreting
from tests.helpers.tiny_models import make_tiny_model


def _tables(rows: int, shared_blocks: int, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    tables = rng.permutation(rows * width).reshape(rows, width).astype(np.int32) + 100
    tables[:, :shared_blocks] = np.arange(shared_blocks)
    return tables


def test_shared_prefix_counts_whole_blocks_held_alike():
    lens = np.full(8, 600)
    assert shared_prefix_len(_tables(8, 20), lens, 16) == 256  # 320 keys, whole 128s
    assert shared_prefix_len(_tables(8, 24), lens, 16) == 384
    # one row parts after 16 blocks: the shared prefix ends there
    tables = _tables(8, 24)
    tables[5, 16] = 7
    assert shared_prefix_len(tables, lens, 16) == 256


def test_shared_prefix_stops_before_each_newest_key():
    # 24 shared blocks (384 keys), but one context is 300 keys long: its block 18 holds
    # this step's key, so at most 18 blocks (288 keys) count, 256 once aligned.
    lens = np.array([600] * 7 + [300])
    assert shared_prefix_len(_tables(8, 24), lens, 16) == 256
    assert shared_prefix_len(_tables(8, 24), np.array([600] * 7 + [257]), 16) == 256
    assert shared_prefix_len(_tables(8, 24), np.array([600] * 7 + [256]), 16) == 0


def test_shared_prefix_needs_a_wide_batch_and_a_long_prefix():
    assert shared_prefix_len(_tables(7, 24), np.full(7, 600), 16) == 0  # too few rows
    assert shared_prefix_len(_tables(8, 15), np.full(8, 600), 16) == 0  # 240 keys
    assert shared_prefix_len(_tables(8, 3), np.full(8, 600), 128) == 384  # big blocks


def test_cascade_graph_sizes():
    assert cascade_sizes(capture_sizes(256)) == [8, 16, 24, 32, 64, 96, 128, 160, 192, 224, 256]
    assert cascade_sizes(capture_sizes(100)) == [8, 16, 24, 32, 64, 96, 100]


def test_capture_sizes_are_vllms():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(1024) == [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    assert capture_sizes(300) == [1, 2, 4, *range(8, 256, 8), *range(256, 300, 16), 300]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1024, [4, 1, 2048]) == [1, 4]
    assert cascade_sizes([1, 2, 4]) == []


@pytest.mark.slow
@pytest.mark.skipif(not interpreting(), reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_engine_tokens_with_cascade_equal_the_reference(tmp_path, monkeypatch):
    # Eight requests behind a 264-token prefix the cache already holds: their decode steps
    # take the cascade kernel (counted), and give the reference kernels' greedy tokens.
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    path = str(make_tiny_model(tmp_path / "llama", "llama"))
    rng = np.random.default_rng(3)
    shared = rng.integers(10, 5000, 264).tolist()
    prompts = [shared + rng.integers(10, 5000, 2 + i).tolist() for i in range(8)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def run() -> list[list[int]]:
        llm = LLM(
            path, max_model_len=512, block_size=16, distributed_executor_backend="uni"
        )  # the worker in this process, where the kernel is counted
        llm.generate([shared], SamplingParams(max_tokens=1))  # caches the prefix
        outs = llm.generate(prompts, params)
        llm.shutdown()
        return [o.outputs[0].token_ids for o in outs]

    monkeypatch.setenv("TESSERA_KERNELS", "ref")
    want = run()
    calls = []
    cascade = kernels.attention.paged_attention_cascade_triton
    monkeypatch.setattr(
        kernels.attention,
        "paged_attention_cascade_triton",
        lambda *a, **kw: calls.append(int(a[-1][0])) or cascade(*a, **kw),
    )
    monkeypatch.setenv("TESSERA_KERNELS", "triton")
    # The linear layers stay on F.linear: the interpreted skinny GEMM over the 50K-token
    # LM head would take half of this test (it has tests of its own, and
    # test_models.py::test_triton_kernels_give_the_same_tokens runs it in a model).
    monkeypatch.setattr(kernels.skinny_gemm, "takes_skinny", lambda x, weight: False)
    assert run() == want
    assert calls and set(calls) == {256}, calls
