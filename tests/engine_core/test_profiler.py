"""The torch profiler in the workers: LLM.start_profile / stop_profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_core import LLM, SamplingParams
from executor.profiler import PROFILER_DIR_ENV
from tests.helpers.tiny_models import make_tiny_model


@pytest.mark.slow
def test_profile_writes_a_trace_and_a_table_per_worker(tmp_path, monkeypatch):
    path = str(make_tiny_model(tmp_path / "m", "llama"))
    monkeypatch.setenv(PROFILER_DIR_ENV, str(tmp_path / "prof"))  # the workers inherit it
    with LLM(path, max_model_len=128, skip_tokenizer_init=True) as llm:
        with pytest.raises(RuntimeError, match="not running"):
            llm.stop_profile()
        llm.start_profile()
        with pytest.raises(RuntimeError, match="already running"):
            llm.start_profile()
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
        files = llm.stop_profile()
    trace, table = (Path(f) for f in files)
    assert trace.parent == tmp_path / "prof" and trace.name.startswith("rank0-")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)
    assert "aten::" in table.read_text()


def test_profiling_is_off_without_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILER_DIR_ENV, raising=False)
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    path = str(make_tiny_model(tmp_path / "m", "llama"))
    with LLM(
        path, max_model_len=128, skip_tokenizer_init=True, distributed_executor_backend="uni"
    ) as llm:
        with pytest.raises(RuntimeError, match=PROFILER_DIR_ENV):
            llm.start_profile()
