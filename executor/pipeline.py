"""Pipeline parallelism: this worker's stage, its share of the layers, and the hand-over.

Ranks are laid out stage by stage: rank = stage * TP + tp_rank. Stage s runs a
contiguous run of decoder layers (`stage_layers`); the first stage also holds the
embedding, the last the final norm and the LM head (and samples). Between stages
each rank sends its step's intermediate tensors (hidden states, and the residual
stream where the model carries one; [num_tokens, hidden] each) to the rank of the
same tp_rank in the next stage, with torch.distributed point-to-point (gloo on the
CPU, NCCL on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# name -> tensor handed from one stage to the next, in a fixed order per model
IntermediateTensors = dict[str, torch.Tensor]


def stage_layers(num_layers: int, num_stages: int, stage: int) -> tuple[int, int]:
    """The [start, end) layers of `stage`: contiguous, sizes differing by at most one.

    The first num_layers % num_stages stages take one layer more: the last stage
    also computes the LM head and samples, so it is the one to keep light.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of {num_stages} pipeline stages")
    if num_layers < num_stages:
        raise ValueError(f"{num_layers} layers cannot be split over {num_stages} pipeline stages")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


@dataclass(frozen=True)
class PPGroup:
    """This process's pipeline stage and its neighbours (global ranks)."""

    stage: int = 0
    size: int = 1
    prev_rank: int | None = None  # same tp_rank, stage - 1
    next_rank: int | None = None  # same tp_rank, stage + 1

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return stage_layers(num_layers, self.size, self.stage)

    def send(self, tensors: IntermediateTensors) -> None:
        """Hand this stage's output to the next stage (in the dict's order)."""
        assert self.next_rank is not None, "the last stage sends nothing"
        for t in tensors.values():
            dist.send(t.contiguous(), self.next_rank)

    def recv(self, buffers: IntermediateTensors) -> IntermediateTensors:
        """Fill `buffers` (shaped by the receiver) from the previous stage."""
        assert self.prev_rank is not None, "the first stage receives nothing"
        for t in buffers.values():
            dist.recv(t, self.prev_rank)
        return buffers


# Installed by executor/distributed.py before the model is built, as the TP group is.
_pp_group = PPGroup()


def set_pp_group(group: PPGroup) -> None:
    global _pp_group
    _pp_group = group


def get_pp_group() -> PPGroup:
    """This process's pipeline stage; models read it when they are built."""
    return _pp_group


class MissingLayer(nn.Module):
    """Stands in for a layer another stage runs, so layer names and indices stay global."""

    def forward(self, *args: object) -> None:
        raise RuntimeError("a layer of another pipeline stage was called")


def make_layers(
    num_layers: int, build: Callable[[int], nn.Module], pp: PPGroup
) -> tuple[int, int, nn.ModuleList]:
    """(start, end, layers): build(i) for this stage's layers, MissingLayer elsewhere."""
    start, end = pp.layer_range(num_layers)
    layers = nn.ModuleList(
        build(i) if start <= i < end else MissingLayer() for i in range(num_layers)
    )
    return start, end, layers
