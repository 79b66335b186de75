"""The `uni` executor: one worker inside the engine-core process."""

from __future__ import annotations

from typing import Any

from executor.base import Executor
from executor.messages import StepInput, StepOutput
from executor.worker import make_worker


class UniExecutor(Executor):
    def initialize(self) -> int:
        self.worker = make_worker(self.config)
        self.worker.load_model()
        num_blocks = self.worker.determine_num_blocks()
        self.worker.init_cache(num_blocks)
        return num_blocks

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def check_health(self) -> None:
        self.worker.check_health()

    def shutdown(self) -> None:
        self.worker = None  # type: ignore[assignment]
