"""-O 3: the model forward under torch.compile (inductor, on the CPU here) gives the
same greedy tokens as eager execution, and compiles once for every batch shape."""

from __future__ import annotations

import pytest
import torch

from engine_core import LLM
from tests.helpers.generate import greedy_tokens
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = [[11, 402, 93, 1204, 77, 5], [300, 301, 302, 9, 17, 2048, 4000, 12, 8], [7, 8, 9]]


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")


def _tokens(path, **kw) -> list[list[int]]:
    with LLM(str(path), max_model_len=128, distributed_executor_backend="uni", **kw) as llm:
        out = greedy_tokens(llm, PROMPTS, 8)
        forward = llm.engine.core.executor.worker.runner.model.forward
    assert hasattr(forward, "_torchdynamo_orig_callable") == ("compilation_config" in kw)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3"])
def test_compiled_forward_matches_eager(arch: str, tmp_path) -> None:
    path = make_tiny_model(tmp_path / arch, arch)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        compiled = _tokens(path, compilation_config=3)
    assert compiled == _tokens(path)
