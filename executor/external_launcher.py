"""The `external_launcher` executor: under torchrun, one in-process worker per rank.

torchrun starts one process per rank and sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. Each process builds its own engine (core in-process)
with one worker here, on the device of its local rank. The process group is the
user's when they initialized torch.distributed, else made here from those variables.
Every rank gets the same requests and schedules them deterministically, so the
ranks run the same steps in lockstep with no messages besides the model's own
collectives, and each rank returns the same outputs.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from executor.base import Executor
from executor.config import ArgumentError
from executor.distributed import destroy_distributed, min_over_ranks
from executor.layers.linear import TPGroup, set_tp_group
from executor.messages import StepInput, StepOutput
from executor.worker import Worker, make_worker

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
BACKEND_FLAG = "--distributed-executor-backend"


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun set them."""
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise ArgumentError(
            BACKEND_FLAG,
            "external_launcher",
            f"{', '.join(missing)} not set: run under torchrun (or set RANK, LOCAL_RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT)",
        )
    rank, local_rank, world = (int(os.environ[name]) for name in LAUNCHER_ENV)
    return rank, local_rank, world


def check_world_size(world: int, tp: int, pp: int) -> None:
    """The launcher's world must be exactly the engine's ranks (TP x PP)."""
    if world != tp * pp:
        raise ArgumentError(
            "--tensor-parallel-size",
            tp,
            f"external_launcher started {world} ranks (WORLD_SIZE, or the process group "
            f"already initialized) but tensor x pipeline parallel size is {tp} x {pp} = "
            f"{tp * pp}: they must be equal",
        )


class ExternalLauncherExecutor(Executor):
    worker: Worker | None = None

    def initialize(self) -> int:
        par = self.config.parallel
        rank, local_rank, world = launcher_ranks()
        check_world_size(world, par.tensor_parallel_size, par.pipeline_parallel_size)
        if dist.is_initialized():
            check_world_size(
                dist.get_world_size(), par.tensor_parallel_size, par.pipeline_parallel_size
            )
        # A group the user made stays theirs: we leave it up at shutdown.
        self._owns_group = not dist.is_initialized()
        worker = make_worker(self.config, rank, local_rank, "env://")
        self.worker = worker
        worker.load_model()
        num_blocks = min_over_ranks(worker.determine_num_blocks(), worker.device)
        worker.init_cache(num_blocks)
        return num_blocks

    def execute(self, step: StepInput) -> StepOutput:
        assert self.worker is not None
        return self.worker.execute(step)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        # Every rank makes the same call on its own engine: each answers for itself.
        assert self.worker is not None
        return [getattr(self.worker, method)(*args)]

    def check_health(self) -> None:
        assert self.worker is not None
        self.worker.check_health()

    def shutdown(self) -> None:
        if self.worker is None:
            return
        self.worker = None
        if self._owns_group:
            destroy_distributed(wait_for_peers=True)
        else:
            set_tp_group(TPGroup())
