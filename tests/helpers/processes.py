"""The engine processes a test started, for the no-orphans checks."""

from __future__ import annotations

import psutil


def children() -> list[psutil.Process]:
    """Our engine processes (multiprocessing's resource tracker lives on by design)."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    return procs
