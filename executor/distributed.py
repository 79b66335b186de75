"""Process groups of the workers: torch.distributed (NCCL on CUDA, gloo on the CPU).

Every worker of an engine joins one group of world size TP (x PP); the layers read
their tensor-parallel rank and size from `executor.layers.linear.get_tp_group()`,
which `init_distributed` installs before the model is built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

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


def in_loading_waves(
    load: Callable[[], None], local_rank: int, max_parallel: int | None, world_size: int
) -> None:
    """Run `load()` in this rank's wave: at most `max_parallel` local ranks load at once.

    Wave w holds local ranks [w * max_parallel, (w + 1) * max_parallel); a barrier over
    the group ends each wave, so host memory holds at most `max_parallel` ranks' loading
    buffers at a time. Every rank passes the same number of barriers (world_size bounds
    the local ranks of any node).
    """
    if not max_parallel or world_size == 1 or not dist.is_initialized():
        load()
        return
    mine = local_rank // max_parallel
    for wave in range(math.ceil(world_size / max_parallel)):
        if wave == mine:
            load()
        dist.barrier()


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` of all ranks (every rank must size its KV cache alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    x = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())


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
