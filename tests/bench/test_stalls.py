"""bench/stalls.py: per-run step anatomy from a worker extension in the worker process."""

from __future__ import annotations

import gc

from bench.stalls import PHASES, StepStalls, run
from tests.helpers.tiny_models import make_tiny_model


def test_each_run_reports_every_step_binned_and_the_collector(tmp_path) -> None:
    model = make_tiny_model(tmp_path / "llama", "llama")
    prompts = [[11, 12, 13, 14, 15]] * 3 + [[20, 21]]
    params = [dict(max_tokens=m, ignore_eos=True, temperature=0.0) for m in (4, 6, 6, 9)]
    engine = dict(model=str(model), max_model_len=64)  # mp: the worker imports the extension
    results = run(engine, prompts, params, runs=2, slow_ms=0.0)
    assert [r["run"] for r in results] == [0, 1]
    for r in results:
        assert r["output_tokens"] == 25
        (worker,) = r["workers"]
        # the longest request samples 9 times: a prefill step and 8 decodes (how its
        # neighbours' prefills spread over steps depends on when they arrive)
        steps = worker["steps"]
        assert steps >= 9
        bins = worker["bins"]
        assert sum(b["steps"] for b in bins) == steps
        assert {(b["prefill"], b["max_seqs"]) for b in bins} == {(False, 16), (True, 16)}
        assert all(b["host_us"] > 0 and b["idle_us"] >= 0 for b in bins)
        for b in bins:  # the phases are parts of the host time
            parts = [b[f"{p}_us"] for p in PHASES]
            assert all(t > 0 for t in parts) and sum(parts) <= b["host_us"] + len(PHASES)
        # slow_ms=0: every forward is reported; they ran the 17 prompt tokens and one
        # token per decode of each request (25 sampled, 4 of them by the prefills)
        forwards = worker["slow_forwards"]
        assert len(forwards) == steps
        assert sum(f["tokens"] for f in forwards) == 17 + 25 - 4
        assert worker["tokens_computed"] == 17 + 25 - 4
        assert set(worker["gc"]) == {"collections", "total_ms", "max_ms"}


def test_stopping_restores_the_runner_and_the_collector() -> None:
    class Runner:
        def _launch(self, step): ...
        def _finish(self, launched): ...
        def _forward(self, ids, pos, attn): ...
        def _apply_step(self, step): ...
        def _prepare_inputs(self, batch): ...
        def _sample(self, launched, hidden): ...

    ext = StepStalls()
    ext.runner = Runner()  # type: ignore[attr-defined]
    callbacks = list(gc.callbacks)
    ext.stalls_start(5.0)
    assert "_launch" in vars(ext.runner) and len(gc.callbacks) == len(callbacks) + 1
    report = ext.stalls_stop()
    assert not vars(ext.runner) and gc.callbacks == callbacks
    assert report["steps"] == 0 and report["bins"] == []
