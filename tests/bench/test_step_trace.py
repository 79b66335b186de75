"""TESSERA_STEP_TRACE (executor/step_trace.py) and its summary (bench/step_trace.py)."""

from __future__ import annotations

import json

from bench.step_trace import load, summarize
from engine_core import LLM, SamplingParams
from executor import step_trace


def test_an_mp_engine_writes_every_steps_spans(tiny_llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(step_trace.TRACE_ENV, str(tmp_path / "trace"))
    with LLM(str(tiny_llama), max_model_len=64) as llm:
        outs = llm.generate([[11, 12, 13], [20, 21]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "trace").glob("*.json"))
    assert files == ["core", "worker0"]
    steps = load(tmp_path / "trace")
    summary = summarize(steps)
    # a prefill step and five decode steps, at least (warm-up steps are not scheduled)
    assert summary["steps"] >= 6
    # the core schedules ahead (async scheduling); a CPU worker runs each step whole
    for name in ("schedule", "submit", "collect", "update", "run", "answer"):
        assert summary[f"{name}_us"]["median"] >= 0, name
    assert summary["launch_us"] is None and summary["execute_us"] is None
    assert summary["slowest_launches_ms"]
    for step_id in (s for s, ev in steps.items() if "update<" in ev):
        ev = steps[step_id]  # each step's way, in order, across the two processes
        order = ["schedule>", "submit>", "run>", "run<", "answer>", "collect<", "update<"]
        assert [ev[e] for e in order] == sorted(ev[e] for e in order), step_id


def test_summary_of_made_up_spans() -> None:
    ms = 1_000_000
    steps = {
        1: {"schedule>": 0, "schedule<": 1000, "launch>": 10_000, "launch<": 30 * ms},
        2: {"schedule>": 2 * ms, "schedule<": 2 * ms + 3000, "launch>": 31 * ms},
        3: {"schedule>": 6 * ms, "launch>": 40 * ms, "launch<": 41 * ms},
    }
    s = summarize(steps, slowest=1)
    assert s["steps"] == 3
    assert s["between_steps_us"] == {"median": 3000.0, "p90": 4000.0}
    assert s["schedule_us"] == {"median": 2.0, "p90": 3.0}
    assert s["slowest_launches_ms"] == [[1, 29.99]]
    assert s["update_us"] is None
    json.dumps(s)


def test_off_by_default(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(step_trace.TRACE_ENV, raising=False)
    step_trace.start()
    assert step_trace.now() == 0
    step_trace.span("launch", 1, 0)
    step_trace.dump("worker0")
    assert not list(tmp_path.iterdir())
