"""Worker classes for tests of --worker-cls and --worker-extension-cls.

They live in an importable module (not in a test file) because every spawned worker
process imports them by name.
"""

from __future__ import annotations

import os
import time

from executor.worker import Worker


class ShardShapes:
    """--worker-extension-cls: reports the shapes of this rank's parameters."""

    def shard_shapes(self) -> dict[str, list[int]]:
        runner = self.runner  # type: ignore[attr-defined]
        return {name: list(p.shape) for name, p in runner.model.named_parameters()}

    def rank_of_worker(self) -> int:
        return self.rank  # type: ignore[attr-defined]


class ReplacesExecute:
    """--worker-extension-cls that would replace a worker method: refused."""

    def execute(self, step):
        raise AssertionError("never called")


class LoadTimedWorker(Worker):
    """--worker-cls: records when this rank loaded its weights (monotonic clock, shared
    by the processes of one machine)."""

    load_span: tuple[float, float] = (0.0, 0.0)

    def load_weights(self) -> None:
        start = time.monotonic()
        super().load_weights()
        self.load_span = (start, time.monotonic())

    def load_interval(self) -> list[float]:
        return list(self.load_span)


class NotAWorker:
    """--worker-cls that does not subclass Worker: refused."""


class ProcessId:
    """--worker-extension-cls: the process id of each rank (to kill one in a test)."""

    def process_id(self) -> int:
        return os.getpid()


class OverlappingWorker(Worker):
    """--worker-cls: launches step N+1 before answering step N on the CPU too, as the
    worker process does on CUDA (so that CPU tests exercise that path)."""

    @property
    def overlaps_steps(self) -> bool:
        return self.config.parallel.pipeline_parallel_size == 1


class StepOrderWorker(OverlappingWorker):
    """--worker-cls: an OverlappingWorker that records, per step id, when its launch
    began ("launch"), when its `between` ran ("between"), when it was finished
    ("finish") and when its launch returned ("launched")."""

    def launch(self, step, between=None):
        events = self.__dict__.setdefault("events", [])
        events.append(("launch", step.step_id))

        def noted() -> None:
            events.append(("between", step.step_id))
            between()

        out = super().launch(step, noted if between is not None else None)
        events.append(("launched", step.step_id))
        return out

    def finish(self, launched):
        self.__dict__.setdefault("events", []).append(("finish", launched.step.step_id))
        return super().finish(launched)

    def step_events(self) -> list[tuple[str, int]]:
        return self.__dict__.get("events", [])


class HeapState:
    """--worker-extension-cls: how many objects the garbage collector has frozen."""

    def frozen_objects(self) -> int:
        import gc

        return gc.get_freeze_count()
