"""A spawned process whose parent dies before it asks to die with it still goes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import psutil

from executor.ipc import die_with_parent


def _late_child(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(2.0)  # the parent is gone by now: no death signal will ever come
    die_with_parent()
    time.sleep(120.0)  # an orphan would still be here


def _short_lived_parent(pid_file: str) -> None:
    child = multiprocessing.get_context("spawn").Process(target=_late_child, args=(pid_file,))
    child.start()
    os._exit(0)  # without waiting for the child


def test_a_child_whose_parent_already_died_exits(tmp_path):
    pid_file = tmp_path / "child.pid"
    ctx = multiprocessing.get_context("spawn")
    parent = ctx.Process(target=_short_lived_parent, args=(str(pid_file),))
    parent.start()
    parent.join(60)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    try:
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone, "the child outlived its parent"
    finally:
        if child.is_running():
            child.kill()
