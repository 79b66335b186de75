"""Process groups of the workers: torch.distributed (NCCL on CUDA, gloo on the CPU).

Every worker of an engine joins one group of world size TP (x PP); the layers read
their tensor-parallel rank and size from `executor.layers.linear.get_tp_group()`,
which `init_distributed` installs before the model is built.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from executor.config import EngineConfig
from executor.layers.linear import TPGroup, set_tp_group

logger = logging.getLogger(__name__)


def init_distributed(config: EngineConfig, rank: int, init_method: str | None) -> None:
    """Join the workers' process group (a no-op for a single worker)."""
    par = config.parallel
    world = par.world_size
    if world == 1:
        return
    if par.pipeline_parallel_size != 1:
        raise ValueError("pipeline parallelism is not in this build yet")
    if init_method is None:
        raise ValueError("a multi-worker engine needs an init method for torch.distributed")
    backend = "nccl" if config.device.device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    set_tp_group(TPGroup(rank, par.tensor_parallel_size, dist.group.WORLD))
    logger.info("rank %d of %d joined the %s group", rank, world, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TPGroup())


def check_same_on_all_ranks(x: torch.Tensor) -> bool:
    """Whether every rank holds the same tensor (a debugging aid for lockstep sampling)."""
    if not dist.is_initialized():
        return True
    ref = x.clone()
    dist.broadcast(ref, src=0)
    return bool(torch.equal(ref, x))
