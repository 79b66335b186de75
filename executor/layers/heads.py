"""How attention heads split over tensor-parallel ranks, zero-padded when they don't divide.

Every rank must hold the same number of query heads and kv heads, and each of its
query heads must find its kv head on the same rank. Query head j of the model
attends with kv head j // group (group = num_heads // num_kv_heads). When the head
counts do not split that way, the layout adds zero heads until they do:

- num_kv_heads >= tp: the kv heads are padded to the next multiple of tp, each new
  kv head bringing `group` new query heads (kv_slots = ceil(Hk / tp) * tp). Ranks
  hold consecutive kv heads with their query groups; the padding lands on the last
  ranks (SmolLM2, 9 q / 3 kv heads at tp=2: rank 0 holds kv 0-1 and q 0-5, rank 1
  kv 2 and a zero kv head, q 6-8 and three zero q heads).
- num_kv_heads < tp: each rank holds one kv head, replicated on `replicas` ranks.
  The kv heads are first padded to the smallest divisor of tp that is not below
  their count (so the replicas are equal), then each group of query heads is padded
  to a multiple of `replicas` and split over its kv head's ranks. Padding at the end
  of the model's heads would not do here: a query head would move to a rank that
  holds another kv head (6 q / 2 kv at tp=4 pads each group [q0 q1 q2 0]).

Why the result is exact: a zero head has zero q/k/v weight rows (and zero bias
rows), so its q, k and v are 0 (RMS norms and rotary keep 0 at 0), and its columns
of the output projection are zero, so whatever its attention produces (a mean of v,
finite) is multiplied by 0 before the all-reduce. The padded model computes the
unpadded model's function, at the cost of the zero heads' work.

Without a need to pad the layout is the plain even split (no change for divisible
configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HeadLayout:
    """The heads of one attention layer over `tp_size` ranks (see the module docstring)."""

    num_heads: int  # the model's query heads
    num_kv_heads: int  # the model's kv heads
    tp_size: int
    kv_slots: int  # distinct kv heads after padding
    replicas: int  # ranks holding each kv head (1 unless num_kv_heads < tp_size)
    group_pad: int  # query heads per kv head after padding

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def padded_heads(self) -> int:
        """Query heads after padding, over all ranks (each counted once)."""
        return self.kv_slots * self.group_pad

    @property
    def local_heads(self) -> int:
        """Query heads on one rank, zero heads included."""
        return self.padded_heads // self.tp_size

    @property
    def local_kv_heads(self) -> int:
        """Kv heads on one rank (the KV cache's head count), zero heads included."""
        return self.kv_slots * self.replicas // self.tp_size

    @property
    def padded(self) -> bool:
        return self.padded_heads != self.num_heads

    def q_sources(self, rank: int) -> list[int | None]:
        """For each query head of `rank`: the model's query head it holds, None for zero."""
        out: list[int | None] = []
        for i in range(self.local_heads):
            slot, pos = divmod(rank * self.local_heads + i, self.group_pad)
            real = slot < self.num_kv_heads and pos < self.group
            out.append(slot * self.group + pos if real else None)
        return out

    def kv_sources(self, rank: int) -> list[int | None]:
        """For each kv head of `rank`: the model's kv head it holds, None for zero."""
        first = rank // self.replicas * self.local_kv_heads
        slots = range(first, first + self.local_kv_heads)
        return [s if s < self.num_kv_heads else None for s in slots]

    def describe(self) -> str:
        return (
            f"{self.num_heads} query / {self.num_kv_heads} kv heads padded to "
            f"{self.padded_heads} / {self.kv_slots} for tensor parallel size {self.tp_size} "
            f"({self.local_heads} / {self.local_kv_heads} per rank)"
        )


def head_layout(num_heads: int, num_kv_heads: int, tp_size: int) -> HeadLayout:
    """The layout of `num_heads` query and `num_kv_heads` kv heads over `tp_size` ranks.

    ValueError when the head counts are not a grouped-query attention (no padding
    can make those exact).
    """
    if num_heads < 1 or num_kv_heads < 1 or tp_size < 1:
        raise ValueError(
            f"head counts and tensor parallel size must be positive: {num_heads} query "
            f"heads, {num_kv_heads} kv heads, tensor parallel size {tp_size}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{num_heads} query heads do not group over {num_kv_heads} kv heads, so they "
            f"cannot be split over tensor parallel size {tp_size}"
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        kv_slots = math.ceil(num_kv_heads / tp_size) * tp_size
        return HeadLayout(num_heads, num_kv_heads, tp_size, kv_slots, 1, group)
    kv_slots = min(d for d in range(num_kv_heads, tp_size + 1) if tp_size % d == 0)
    replicas = tp_size // kv_slots
    group_pad = math.ceil(group / replicas) * replicas
    return HeadLayout(num_heads, num_kv_heads, tp_size, kv_slots, replicas, group_pad)
