"""bench/host_launch.py: every piece of a step timed, and the methods put back after."""

from __future__ import annotations

from bench.host_launch import run_batch, timed_pieces
from engine_core import LLM
from executor.model_runner import ModelRunner


def test_a_batch_times_each_piece_of_its_steps(tiny_llama, monkeypatch) -> None:
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    launch = ModelRunner.__dict__["_launch"]
    with LLM(str(tiny_llama), max_model_len=64, distributed_executor_backend="uni") as llm:
        result = run_batch(llm, size=3, context=5, output_len=4, seed=0)
    assert ModelRunner.__dict__["_launch"] is launch  # unwrapped again
    assert result["batch"] == 3 and result["ms_per_step"] > 0
    pieces = result["median_us"]
    for name in ("_launch", "_prepare_inputs", "_forward", "_sample", "_finish"):
        assert pieces[f"ModelRunner.{name}"] > 0, name
    # the launch holds its parts
    parts = sum(pieces[f"ModelRunner.{n}"] for n in ("_prepare_inputs", "_forward", "_sample"))
    assert pieces["ModelRunner._launch"] >= 0.9 * parts


def test_the_methods_come_back_when_the_run_fails() -> None:
    launch = ModelRunner.__dict__["_launch"]
    try:
        with timed_pieces({}):
            assert ModelRunner.__dict__["_launch"] is not launch
            raise KeyError("boom")
    except KeyError:
        pass
    assert ModelRunner.__dict__["_launch"] is launch
