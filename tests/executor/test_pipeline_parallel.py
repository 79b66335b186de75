"""Pipeline parallelism: the layer split, stage models, and PP on the CPU (gloo).

The in-process tests chain the stages of one model (no send/recv) and check them
against the whole model; the slow ones run real engines (one worker process per
rank) and check greedy tokens against one worker, and that micro-batches overlap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine_core import LLM, SamplingParams
from engine_core.args import EngineArgs
from engine_core.config import ConfigError, resolve_config
from executor.loader import load_model
from executor.pipeline import PPGroup, set_pp_group, stage_layers
from tests.helpers.generate import GREEDY, random_prompts
from tests.helpers.processes import children
from tests.helpers.tiny_models import (
    TINY_ARCHS,
    greedy_generate,
    make_engine_config,
    make_tiny_model,
    smollm2_gguf_path,
)

# SmolLM2 token ids of "The capital of France is", "def fibonacci(n):\n" and
# "Once upon a time, in a small village,".
SMOLLM2_PROMPTS = [
    [504, 3575, 282, 4649, 314],
    [1604, 3987, 46477, 24, 94, 727, 198],
    [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28],
]


# ---- the layer split ------------------------------------------------------------------


def test_stage_layers_are_contiguous_and_even() -> None:
    for layers in range(1, 13):
        for stages in range(1, layers + 1):
            ranges = [stage_layers(layers, stages, s) for s in range(stages)]
            assert ranges[0][0] == 0 and ranges[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [end - start for start, end in ranges]
            # sizes differ by one at most, the larger ones first (the last stage samples)
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)
    assert [stage_layers(30, 4, s) for s in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    with pytest.raises(ValueError, match="3 pipeline stages"):
        stage_layers(2, 3, 0)


# ---- stage models, chained in this process ------------------------------------------------


@contextmanager
def as_stage(stage: int, num_stages: int) -> Iterator[None]:
    set_pp_group(PPGroup(stage, num_stages))
    try:
        yield
    finally:
        set_pp_group(PPGroup())


class Chained(nn.Module):
    """A model's pipeline stages run one after another, each on the previous one's output."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        out = None
        for stage in self.stages:
            out = stage(input_ids, positions, out)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stages[-1].compute_logits(hidden)  # type: ignore[operator]


def load_stages(path: Path, num_stages: int) -> list[nn.Module]:
    config = make_engine_config(path)
    stages = []
    for s in range(num_stages):
        with as_stage(s, num_stages):
            stages.append(load_model(config, torch.device("cpu")))
    return stages


# every architecture, tied embeddings (the last stage loads the table as its head), and
# post-norm OPT with project_in/out
CASES = [(arch, {}) for arch in TINY_ARCHS] + [
    ("qwen2", {"tie_word_embeddings": True}),
    ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
]


@pytest.mark.parametrize("arch, overrides", CASES, ids=["-".join([a, *o]) for a, o in CASES])
def test_chained_stages_equal_the_whole_model(arch: str, overrides: dict, tmp_path: Path) -> None:
    layers_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    path = make_tiny_model(tmp_path / arch, arch, **{layers_key: 3}, **overrides)
    config = make_engine_config(path)
    whole = load_model(config, torch.device("cpu"))
    hf_config = config.model.hf_config
    ps = random_prompts(3, seed=1)
    want = greedy_generate(whole, hf_config, ps, max_new_tokens=8).tokens
    for num_stages in (2, 3):
        stages = load_stages(path, num_stages)
        got = greedy_generate(Chained(stages), hf_config, ps, max_new_tokens=8).tokens
        assert got == want, f"{arch}: {num_stages} stages"
    # layers 0-1 and 2; the head (with the table, when tied) only on the last stage
    first, last = load_stages(path, 2)
    first_names = [n for n, _ in first.named_parameters()]
    last_params = dict(last.named_parameters())
    assert not any(".2." in n or "lm_head" in n for n in first_names)
    assert not any(".0." in n or ".1." in n for n in last_params)
    assert torch.equal(last_params["lm_head.weight"], whole.lm_head.weight)


# ---- refusals ---------------------------------------------------------------------------


def test_pp_refusals(tmp_path: Path) -> None:
    path = str(make_tiny_model(tmp_path / "llama", "llama"))  # 2 layers
    with pytest.raises(ConfigError, match="pipeline-parallel-size=3.*2 layers"):
        resolve_config(EngineArgs(model=path, pipeline_parallel_size=3))
    with pytest.raises(ConfigError, match="backend=uni.*--pipeline-parallel-size 2 needs mp"):
        resolve_config(
            EngineArgs(model=path, pipeline_parallel_size=2, distributed_executor_backend="uni")
        )
    config = resolve_config(EngineArgs(model=path, pipeline_parallel_size=2))
    assert config.parallel.distributed_executor_backend == "mp"
    assert (config.parallel.world_size, config.parallel.output_rank) == (2, 1)


# ---- engines, one worker process per rank --------------------------------------------------


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """After the test (passed or not) no engine process of ours may remain."""
    yield
    deadline = time.monotonic() + 10
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = children()
    for p in left:
        p.kill()
    assert left == []


def generate(
    path: str, ps: list[list[int]], max_tokens: int, monkeypatch, inproc: bool, **engine_args: Any
) -> tuple[list[list[int]], int]:
    """Greedy tokens per prompt, and the most steps in flight at once (known with inproc).

    inproc runs the engine core in this process (its workers apart), else in its own.
    """
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0" if inproc else "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2-4 workers share two cores
    most = [0]
    with LLM(path, max_model_len=256, skip_tokenizer_init=True, **engine_args) as llm:
        if inproc:
            count_in_flight(llm.engine.core, most)  # type: ignore[union-attr]
        params = SamplingParams(max_tokens=max_tokens, **GREEDY)
        outs = llm.generate(ps, params, use_tqdm=False)
        if inproc:
            assert not llm.engine.core.in_flight  # type: ignore[union-attr]
    return [list(o.outputs[0].token_ids) for o in outs], most[0]


def count_in_flight(core: Any, most: list[int]) -> None:
    """Keep in most[0] the largest number of steps in flight when a result is awaited."""
    collect = core.executor.collect

    def counting_collect():
        most[0] = max(most[0], len(core.in_flight))
        return collect()

    core.executor.collect = counting_collect


_REFERENCES: dict[tuple[str, str, int], list[list[int]]] = {}


def reference(path: str, ps: list[list[int]], max_tokens: int, monkeypatch) -> list[list[int]]:
    """One uni worker's tokens, computed once per model, prompts and length."""
    key = (path, repr(ps), max_tokens)
    if key not in _REFERENCES:
        _REFERENCES[key], _ = generate(
            path, ps, max_tokens, monkeypatch, True, distributed_executor_backend="uni"
        )
    return _REFERENCES[key]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {arch: str(make_tiny_model(tmp_path_factory.mktemp(arch), arch)) for arch in TINY_ARCHS}


# TP x PP only changes how ranks group, not what a layer computes: three layouts of
# attention and MLP (GQA with SwiGLU, q/k norms, learned positions with GELU) cover it;
# every architecture runs with PP alone and, in test_tensor_parallel, with TP alone.
TP_PP_ARCHS = ("llama", "qwen3", "gpt2")


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)], ids=["pp2", "tp2-pp2"])
def test_pipeline_equals_one_worker(tp, pp, tiny_models, monkeypatch, no_leftovers) -> None:
    # 5 requests: micro-batches of 3 and 2 run in the two stages at once
    ps = random_prompts(5, seed=4)
    for arch, path in tiny_models.items():
        if tp > 1 and arch not in TP_PP_ARCHS:
            continue
        want = reference(path, ps, 12, monkeypatch)
        got, most_in_flight = generate(
            path, ps, 12, monkeypatch, True, tensor_parallel_size=tp, pipeline_parallel_size=pp
        )
        assert got == want, arch
        assert most_in_flight == pp, arch


@pytest.mark.slow
def test_smollm2_pipeline_equals_one_worker(monkeypatch, no_leftovers) -> None:
    # float32; the engine core in its own process this time (its busy loop keeps the
    # micro-batches in flight)
    path = str(smollm2_gguf_path())
    want = reference(path, SMOLLM2_PROMPTS, 16, monkeypatch)
    got, _ = generate(path, SMOLLM2_PROMPTS, 16, monkeypatch, False, pipeline_parallel_size=2)
    assert got == want
