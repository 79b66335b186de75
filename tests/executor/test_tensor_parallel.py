"""Tensor parallelism on the CPU (gloo): TP=2 and 4 give the greedy tokens of TP=1,\nalso where the attention heads do not divide and zero heads pad them."""

from __future__ import annotations

import pytest

from engine_core import LLM, SamplingParams
from engine_core.args import EngineArgs
from engine_core.config import ConfigError, resolve_config
from tests.helpers.generate import GREEDY, random_prompts, token_ids
from tests.helpers.tiny_models import TINY_ARCHS, make_tiny_model, smollm2_gguf_path


def greedy(path: str, tp: int, ps, monkeypatch, max_tokens: int = 12, **engine_args):
    """Greedy tokens at TP=tp: mp worker processes, or for the TP=1 reference one uni
    worker in this process (the tokens are the same; a worker process costs seconds)."""
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")  # the core here, workers apart
    if tp > 1:
        # The ranks share the test machine's few cores: torch's default of a thread per
        # core in every worker oversubscribes them (TP=4 decodes ~10x slower).
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with LLM(
        path,
        max_model_len=256,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp" if tp > 1 else "uni",
        **engine_args,
    ) as llm:
        outs = llm.generate(ps, SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)
        if tp > 1:
            shapes = llm.collective_rpc("kv_cache_dtype_name")
            assert len(shapes) == tp  # one answer per rank
    return token_ids(outs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tp2_equals_tp1(arch, tmp_path, monkeypatch):
    path = str(make_tiny_model(tmp_path / arch, arch))
    ps = random_prompts(4, seed=3)
    assert greedy(path, 2, ps, monkeypatch) == greedy(path, 1, ps, monkeypatch)


# Head counts no TP size here divides: zero heads pad them (executor/layers/heads.py).
GQA_6_3 = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
PADDED = {
    "llama": GQA_6_3,
    "qwen2": GQA_6_3,  # q/k/v biases: the zero heads' bias rows are zero too
    "qwen3": GQA_6_3,  # q/k norms map the zero heads' q and k to zero
    "gpt2": dict(n_embd=96, n_head=3),  # one merged c_attn tensor, Conv1D c_proj
}


PADDED_PROMPTS = random_prompts(3, seed=5)


@pytest.fixture(scope="module")
def padded_tp1(tmp_path_factory):
    """arch -> (model folder, its TP=1 tokens), each made once (llama runs at TP 2 and 4)."""
    made: dict[str, tuple[str, list[list[int]]]] = {}

    def get(arch: str, monkeypatch) -> tuple[str, list[list[int]]]:
        if arch not in made:
            path = str(make_tiny_model(tmp_path_factory.mktemp(arch), arch, **PADDED[arch]))
            made[arch] = path, greedy(path, 1, PADDED_PROMPTS, monkeypatch)
        return made[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "tp"), [("llama", 2), ("llama", 4), ("qwen2", 4), ("qwen3", 2), ("gpt2", 2)]
)
def test_padded_heads_equal_tp1(arch, tp, padded_tp1, monkeypatch):
    path, want = padded_tp1(arch, monkeypatch)
    assert greedy(path, tp, PADDED_PROMPTS, monkeypatch) == want


SMOLLM2_PROMPTS = ["The capital of France is", "def add(a, b):"]


@pytest.fixture(scope="module")
def smollm2_tp1() -> list[list[int]]:
    with pytest.MonkeyPatch.context() as mp:
        return greedy(str(smollm2_gguf_path()), 1, SMOLLM2_PROMPTS, mp, 16, dtype="float32")


@pytest.mark.slow
def test_smollm2_gguf_equals_tp1(smollm2_tp1, monkeypatch):
    # SmolLM2-135M: 9 query / 3 kv heads, padded to 12 / 4 at TP 2 (and alike at TP 4,
    # which test_padded_heads_equal_tp1 runs on tiny models: four SmolLM2 workers took
    # 31 s of the 2-core suite)
    path = str(smollm2_gguf_path())
    assert greedy(path, 2, SMOLLM2_PROMPTS, monkeypatch, 16, dtype="float32") == smollm2_tp1


def test_tp_refusals_name_the_argument(tmp_path):
    path = str(make_tiny_model(tmp_path / "llama", "llama"))  # MLP width 128
    with pytest.raises(ConfigError, match="tensor-parallel-size=3: .*MLP width 128"):
        resolve_config(EngineArgs(model=path, tensor_parallel_size=3))
    odd = str(make_tiny_model(tmp_path / "odd", "llama", num_key_value_heads=3, head_dim=16))
    with pytest.raises(ConfigError, match="tensor-parallel-size=2: 4 query heads do not group"):
        resolve_config(EngineArgs(model=odd, tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="distributed-executor-backend=uni"):
        resolve_config(
            EngineArgs(model=path, tensor_parallel_size=2, distributed_executor_backend="uni")
        )
