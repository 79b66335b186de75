"""Timestamps of each step's way through the engine core and the worker.

Off unless TESSERA_STEP_TRACE names a folder. Then the engine-core process records,
per step, when it scheduled, submitted, collected and updated it, and each worker
process when it launched, finished and answered it, and each writes
`<folder>/<process>-<pid>.json` when its loop ends: a list of [t_ns, event, step_id],
where an event `name>` opens a span and `name<` closes it. Times are CLOCK_MONOTONIC
(time.perf_counter_ns on Linux), so the processes' records line up. bench/step_trace.py
runs a workload with it and tells where the time between two steps goes (it found
W3's 30 ms eager prefill launches).

Recording costs a list append per event; off, a check of a module global.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TRACE_ENV = "TESSERA_STEP_TRACE"

_events: list[tuple[int, str, int]] | None = None


def start() -> None:
    """Record from now on in this process, if TESSERA_STEP_TRACE is set."""
    global _events
    if os.environ.get(TRACE_ENV):
        _events = []


def now() -> int:
    """A span's start time (0 when off)."""
    return time.perf_counter_ns() if _events is not None else 0


def span(name: str, step_id: int, t0: int) -> None:
    """A span of this step from t0 (a `now()`) to now."""
    if _events is not None:
        _events.extend(((t0, name + ">", step_id), (time.perf_counter_ns(), name + "<", step_id)))


def dump(process: str) -> None:
    """Write what this process recorded (see the top), and stop recording."""
    global _events
    events, _events = _events, None
    folder = os.environ.get(TRACE_ENV)
    if events is None or not folder:
        return
    path = Path(folder) / f"{process}-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(events))
