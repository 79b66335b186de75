"""`tessera serve --data-parallel-size 2`: requests spread over both engine cores, every
one is answered, the outputs are those of one engine, /metrics counts per core and in
total."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from engine_core import LLM, SamplingParams
from tests.api_server.serve_helpers import (
    kill_all,
    launch,
    process_tree,
    stop,
    wait_gone,
    wait_ready,
)
from tests.engine_core.test_processes import prompts
from tests.helpers.tiny_models import make_tiny_model

MAX_TOKENS = 8


def samples(text: str, name: str) -> dict[str, float]:
    """label text -> value of every sample of one metric."""
    pattern = rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$"
    return {labels: float(value) for labels, value in re.findall(pattern, text, re.M)}


def per_engine(text: str, name: str) -> dict[str, float]:
    """engine label -> value of a tessera:per_engine_* metric."""
    out = {}
    for labels, value in samples(text, name).items():
        engine = re.search(r'engine="(\d+)"', labels)
        assert engine is not None, labels
        out[engine.group(1)] = value
    return out


def total(text: str, name: str) -> float:
    return sum(samples(text, name).values())


def reference_texts(model: str, ps: list[list[int]], monkeypatch) -> list[str]:
    """Greedy outputs of one in-process engine (DP=1)."""
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model, max_model_len=256, distributed_executor_backend="uni") as llm:
        return [o.outputs[0].text for o in llm.generate(ps, params, use_tqdm=False)]


@pytest.mark.slow
def test_dp2_server_spreads_requests_and_matches_dp1(tmp_path, monkeypatch):
    model = str(make_tiny_model(tmp_path / "llama", "llama"))
    ps = prompts(16, seed=7)
    args = ["--data-parallel-size", "2", "--max-model-len", "256"]
    server = launch([*args, "--distributed-executor-backend", "uni"], model=model)
    tree = []
    try:
        expected = reference_texts(model, ps, monkeypatch)  # while the server starts
        wait_ready(server)
        tree = process_tree(server.proc.pid)
        cores = [p for p in tree[1:] if "spawn_main" in " ".join(p.cmdline())]
        assert len(cores) == 2, server.log_tail()

        def complete(prompt: list[int]) -> str:
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            reply = requests.post(
                server.api_url + "/completions", json={**body, "ignore_eos": True}, timeout=120
            )
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(ps)) as pool:
            texts = list(pool.map(complete, ps))
        assert texts == expected

        text = requests.get(server.url + "/metrics", timeout=30).text
        finished = per_engine(text, "tessera:per_engine_requests_finished_total")
        assert set(finished) == {"0", "1"} and all(finished.values()), finished
        assert sum(finished.values()) == len(ps)
        tokens = per_engine(text, "tessera:per_engine_generation_tokens_total")
        assert sum(tokens.values()) == total(text, "tessera:generation_tokens_total")
        assert total(text, "tessera:generation_tokens_total") == len(ps) * MAX_TOKENS
        running = per_engine(text, "tessera:per_engine_num_requests_running")
        assert running == {"0": 0.0, "1": 0.0}
        assert total(text, "tessera:num_requests_running") == 0
        assert stop(server) == 0, server.log_tail()
        assert not wait_gone(tree), "processes outlived the server"
    finally:
        kill_all(tree + process_tree(server.proc.pid))
