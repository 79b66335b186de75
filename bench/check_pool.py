"""Run independent checks as child processes, a few at a time (bench/gpu_check.py's token
checks: on a GPU machine of 16 cores, most of a check's time is process starts, imports
and Triton compiles, which run side by side).

Each unit is a command that writes its records, a JSON list of dicts, to the file named
by CHECK_RECORDS in its environment. A unit that exits without that file, or runs past
its time, becomes one failed record with the tail of its output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Unit:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    unit: Unit
    proc: subprocess.Popen
    log: Path
    records: Path
    started: float
    timed_out: bool = False


def run_pool(units: list[Unit], jobs: int, timeout_s: float, on_done=None) -> list[dict]:
    """Every unit's records in the units' order; at most `jobs` run at once. `on_done`
    (unit name, its records, seconds) is called as each one ends."""
    done: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="check-pool-") as tmp, _exit_on_sigterm():
        queue = list(units)
        running: list[_Running] = []
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    running.append(_start(queue.pop(0), Path(tmp)))
                time.sleep(0.2)
                for r in [r for r in running if _finished(r, timeout_s)]:
                    running.remove(r)
                    _kill(r)  # what a unit left behind (a crashed engine's processes)
                    done[r.unit.name] = _collect(r, timeout_s)
                    if on_done:
                        on_done(r.unit.name, done[r.unit.name], time.monotonic() - r.started)
        finally:  # an interrupted pool leaves no unit running
            for r in running:
                _kill(r)
    return [rec for u in units for rec in done[u.name]]


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """A SIGTERM (a run's time limit, say) ends the pool through its finally: the units
    sit in sessions of their own, so the signal would not reach them, and they would
    outlive it holding the GPU."""

    def _exit(signum, frame) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start(unit: Unit, tmp: Path) -> _Running:
    log, records = tmp / f"{unit.name}.log", tmp / f"{unit.name}.json"
    env = {**os.environ, **unit.env, "CHECK_RECORDS": str(records)}
    with log.open("w") as f:  # the child keeps its own descriptor
        # a session of its own: a unit past its time is killed with the processes it
        # started (an engine's core and workers)
        proc = subprocess.Popen(
            unit.argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return _Running(unit, proc, log, records, time.monotonic())


def _finished(r: _Running, timeout_s: float) -> bool:
    if r.proc.poll() is not None:
        return True
    if time.monotonic() - r.started > timeout_s:
        _kill(r)
        r.timed_out = True
        return True
    return False


def _kill(r: _Running) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(r.proc.pid, signal.SIGKILL)
    r.proc.wait()


def _collect(r: _Running, timeout_s: float) -> list[dict]:
    if r.records.exists():
        return json.loads(r.records.read_text())
    tail = r.log.read_text(errors="replace")[-3000:]
    why = f"killed after {timeout_s:.0f} s" if r.timed_out else "no records"
    return [{"section": r.unit.name, "check": "unit", "ok": False,
             "detail": f"{why} (exit {r.proc.returncode}): {tail}"}]  # fmt: skip
