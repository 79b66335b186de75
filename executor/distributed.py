"""Process groups of the workers: torch.distributed (NCCL on CUDA, gloo on the CPU).

Every worker of an engine joins one group of world size TP x PP, ranks laid out
stage by stage (rank = stage * TP + tp_rank). Each stage's TP ranks form their own
group; the layers read their tensor-parallel rank and size from
`executor.layers.linear.get_tp_group()` and models their pipeline stage from
`executor.pipeline.get_pp_group()`, both installed here before the model is built.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from executor.config import EngineConfig, ParallelConfig
from executor.layers.linear import TPGroup, set_tp_group
from executor.pipeline import PPGroup, set_pp_group

logger = logging.getLogger(__name__)


def init_distributed(config: EngineConfig, rank: int, init_method: str | None) -> None:
    """Join the workers' process group (a no-op for a single worker)."""
    par = config.parallel
    world = par.world_size
    if world == 1:
        return
    if init_method is None:
        raise ValueError("a multi-worker engine needs an init method for torch.distributed")
    backend = "nccl" if config.device.device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    set_tp_group(_tp_group(par, rank))
    set_pp_group(pp_group_of(par, rank))
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


def _tp_group(par: ParallelConfig, rank: int) -> TPGroup:
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    if tp == 1:
        return TPGroup()
    if pp == 1:
        return TPGroup(rank, tp, dist.group.WORLD)
    # new_group is collective: every rank creates every stage's group, in the same order
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
    return TPGroup(rank % tp, tp, groups[rank // tp])


def pp_group_of(par: ParallelConfig, rank: int) -> PPGroup:
    """Rank `rank`'s stage, and its neighbours: the same tp_rank one stage away."""
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    stage = rank // tp
    return PPGroup(
        stage,
        pp,
        rank - tp if stage > 0 else None,
        rank + tp if stage < pp - 1 else None,
    )


def destroy_distributed(*, wait_for_peers: bool = False) -> None:
    """Leave the process group; with `wait_for_peers`, after every rank has reached here.

    A gloo group torn down while a peer still talks to it may abort the process at exit
    ("terminate called without an active exception"): ranks that all shut down together
    (torchrun's) meet at a barrier first. A dead peer only delays the teardown by
    `PEER_WAIT` on gloo; under NCCL torchrun kills the survivors of a dead rank.
    """
    if dist.is_initialized():
        if wait_for_peers:
            _meet_peers()
        dist.destroy_process_group()
    set_tp_group(TPGroup())
    set_pp_group(PPGroup())


PEER_WAIT = datetime.timedelta(seconds=60)


def _meet_peers() -> None:
    if dist.get_backend() != "gloo":
        dist.barrier()
        return
    try:
        dist.monitored_barrier(timeout=PEER_WAIT)
    except RuntimeError as e:  # a peer is gone: leave anyway
        logger.warning("ranks did not all reach the shutdown: %s", e)


def check_same_on_all_ranks(x: torch.Tensor) -> bool:
    """Whether every rank holds the same tensor (a debugging aid for lockstep sampling)."""
    if not dist.is_initialized():
        return True
    ref = x.clone()
    dist.broadcast(ref, src=0)
    return bool(torch.equal(ref, x))
