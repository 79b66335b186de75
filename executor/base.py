"""The executor interface the engine core drives, whatever runs the workers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from executor.config import EngineConfig
from executor.messages import StepInput, StepOutput


class Executor(ABC):
    # True when submit() only starts a step, so the engine core may schedule the next
    # one meanwhile (async scheduling); False where submit() runs the step itself.
    overlaps_steps = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._done: deque[StepOutput] = deque()  # outputs of submitted steps, oldest first

    @abstractmethod
    def initialize(self) -> int:
        """Start the workers, load the model, size and allocate the KV cache.

        Returns the number of KV blocks (the minimum over workers).
        """

    @abstractmethod
    def execute(self, step: StepInput) -> StepOutput: ...

    def submit(self, step: StepInput) -> None:
        """Start a step without waiting for it; collect() returns outputs in submission order.

        This default runs the step at once (one worker in this process cannot overlap
        steps); the mp executor only sends it, so pipeline stages work on several.
        """
        self._done.append(self.execute(step))

    def collect(self) -> StepOutput:
        """The output of the oldest submitted step not collected yet (waits for it)."""
        return self._done.popleft()

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """Call `method(*args)` on every worker; one result per rank."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise if a worker is dead or broken."""

    @abstractmethod
    def shutdown(self) -> None: ...


def make_executor(config: EngineConfig) -> Executor:
    backend = config.parallel.distributed_executor_backend
    if backend == "uni":
        from executor.uni import UniExecutor

        return UniExecutor(config)
    if backend == "mp":
        from executor.mp import MpExecutor

        return MpExecutor(config)
    if backend == "ray":
        from executor.ray_executor import RayExecutor

        return RayExecutor(config)
    if backend == "external_launcher":
        from executor.external_launcher import ExternalLauncherExecutor

        return ExternalLauncherExecutor(config)
    raise ValueError(f"--distributed-executor-backend={backend}: not available in this build")
