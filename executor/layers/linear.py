"""Linear layers that shard themselves for tensor parallelism.

Every layer holds only this rank's shard of its weight, and every parameter carries a
`weight_loader(param, loaded_weight, shard_id=None)` that narrows the full checkpoint
tensor to that shard. So a model loads the same checkpoint on every rank, and tensor
parallelism at run time is only the collective after a row-parallel layer (all-reduce)
or before the logits (all-gather).

Column parallel: the output features are split across ranks (weight rows).
Row parallel: the input features are split across ranks (weight columns); partial
outputs are summed by an all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from executor.layers.graph_breaks import eager_under_compile
from executor.layers.heads import HeadLayout, head_layout
from kernels.skinny_gemm import linear


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group, and the collectives over it."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1

    # Collectives stay outside torch.compile'd graphs (-O): a graph break, run eagerly.
    @eager_under_compile
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        torch.distributed.all_reduce(x, group=self.group)
        return x

    @eager_under_compile
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


# Seam for tensor parallelism: executor/distributed.py (which owns the process groups)
# calls set_tp_group() once torch.distributed is up. Until then every process is rank 0
# of a group of one, and the collectives above are no-ops.
_tp_group = TPGroup()


def set_tp_group(group: TPGroup) -> None:
    """Install this process's tensor-parallel group (called by executor/distributed.py)."""
    global _tp_group
    _tp_group = group


def get_tp_group() -> TPGroup:
    """This process's tensor-parallel group; layers read it when they are built."""
    return _tp_group


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def set_weight_loader(param: nn.Parameter, loader: Any) -> None:
    # Parameters carry their loader so a model's load_weights needs no layer lookup.
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
) -> None:
    """Copy an unsharded (replicated) tensor into its parameter, checking the shape."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def _copy_narrowed(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch: parameter shard {tuple(dst.shape)}, checkpoint {tuple(src.shape)}"
        )
    dst.copy_(src)


class LinearBase(nn.Module):
    """y = x W^T + b with W stored as [out_per_rank, in_per_rank]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        params_dtype: torch.dtype | None,
        tp: TPGroup | None,
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None else get_tp_group()
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), False)
        set_weight_loader(self.weight, self.weight_loader)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), False)
            set_weight_loader(self.bias, self.weight_loader)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (small projections)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, params_dtype, tp)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; optionally gathered back after the matmul."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        group = tp if tp is not None else get_tp_group()
        super().__init__(in_features, divide(out_features, group.size), bias, params_dtype, group)
        self.full_out_features = out_features
        self.gather_output = gather_output

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        rows = param.shape[0]
        _copy_narrowed(param.data, loaded_weight.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)  # [T, out / tp]
        return self.tp.all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate | up).

    Each rank holds its shard of every projection, concatenated: the checkpoint
    tensors load one at a time with shard_id = their index in `output_sizes`.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        bias: bool = True,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, gather_output, params_dtype, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if shard_id is None:  # an already merged checkpoint tensor
            for i, part in enumerate(loaded_weight.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        src = loaded_weight.narrow(0, self.tp.rank * size, size)
        _copy_narrowed(param.data.narrow(0, offset, size), src)


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections in one column-parallel matmul, with grouped-query heads.

    Heads split over ranks by a `HeadLayout` (executor/layers/heads.py): evenly when
    they divide, with each kv head replicated when there are fewer kv heads than
    ranks, and zero heads added when the counts do not divide. Each rank's parameter
    is [q heads | k heads | v heads] of its own heads, zero rows for zero heads.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        group = tp if tp is not None else get_tp_group()
        kv_total = total_num_kv_heads if total_num_kv_heads is not None else total_num_heads
        self.layout = head_layout(total_num_heads, kv_total, group.size)
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = kv_total
        self.num_heads = self.layout.local_heads
        self.num_kv_heads = self.layout.local_kv_heads
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        out_total = (self.num_heads + 2 * self.num_kv_heads) * group.size * head_size
        super().__init__(hidden_size, out_total, bias, False, params_dtype, group)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if shard_id is None:  # an already merged checkpoint tensor (q | k | v)
            q_total = self.total_num_heads * self.head_size
            kv_total = self.total_num_kv_heads * self.head_size
            parts = loaded_weight.split([q_total, kv_total, kv_total], dim=0)
            for sid, part in zip("qkv", parts, strict=True):
                self.weight_loader(param, part, sid)
            return
        offset, sources, total = self._shard(shard_id)
        dst = param.data.narrow(0, offset, len(sources) * self.head_size)
        _copy_heads(dst, loaded_weight, sources, total, self.head_size, dim=0)

    def _shard(self, shard_id: Any) -> tuple[int, list[int | None], int]:
        # (row offset in the parameter, source head of each local head, model's heads)
        rank = self.tp.rank
        if shard_id == "q":
            return 0, self.layout.q_sources(rank), self.total_num_heads
        if shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            return offset, self.layout.kv_sources(rank), self.total_num_kv_heads
        raise ValueError(f"unknown qkv shard id {shard_id!r}")

    def zero_padded_heads(self) -> None:
        """Zero the rows of zero heads (after a loader that filled every row)."""
        for shard_id in "qkv":
            offset, sources, _ = self._shard(shard_id)
            for param in (self.weight, self.bias):
                if param is not None:
                    dst = param.data.narrow(0, offset, len(sources) * self.head_size)
                    _zero_heads(dst, sources, self.head_size, dim=0)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed by an all-reduce.

    The bias is added once, after the reduction, so it is not counted tp_size times.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        reduce_results: bool = True,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        group = tp if tp is not None else get_tp_group()
        super().__init__(divide(in_features, group.size), out_features, bias, params_dtype, group)
        self.full_in_features = in_features
        self.reduce_results = reduce_results

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if param.dim() == 1:  # the bias is replicated
            default_weight_loader(param, loaded_weight)
            return
        cols = param.shape[1]
        _copy_narrowed(param.data, loaded_weight.narrow(1, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)  # [T, out], a partial sum when tp > 1
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        # Without the reduction the caller sums partial outputs: only rank 0 adds the bias.
        if self.bias is not None and (self.reduce_results or self.tp.rank == 0):
            y = y + self.bias
        return y


class HeadRowParallelLinear(RowParallelLinear):
    """The attention output projection: a row-parallel layer whose input is heads.

    Its input features are this rank's query heads as `layout` places them, so each
    rank takes the checkpoint's columns of its own heads, and zero columns for zero
    heads: a zero head's attention output never reaches the sum.
    """

    def __init__(
        self,
        layout: HeadLayout,
        head_size: int,
        out_features: int,
        bias: bool = True,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        self.layout = layout
        self.head_size = head_size
        in_features = layout.padded_heads * head_size
        super().__init__(in_features, out_features, bias, True, params_dtype, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if param.dim() == 1:  # the bias is replicated
            default_weight_loader(param, loaded_weight)
            return
        sources = self.layout.q_sources(self.tp.rank)
        total = self.layout.num_heads
        _copy_heads(param.data, loaded_weight, sources, total, self.head_size, dim=1)

    def zero_padded_heads(self) -> None:
        """Zero the columns of zero heads (after a loader that filled every column)."""
        sources = self.layout.q_sources(self.tp.rank)
        _zero_heads(self.weight.data, sources, self.head_size, dim=1)


def _copy_heads(
    dst: torch.Tensor,
    src: torch.Tensor,
    sources: list[int | None],
    total_heads: int,
    head_size: int,
    dim: int,
) -> None:
    """dst's head i (head_size rows/columns along dim) <- src's head sources[i]; None: 0.

    src holds the checkpoint's total_heads heads along dim (weight or 1-D bias).
    """
    if src.shape[dim] != total_heads * head_size:
        raise ValueError(
            f"shape mismatch: checkpoint {tuple(src.shape)} has no {total_heads} heads of "
            f"{head_size} along dim {dim}"
        )
    for i, source in enumerate(sources):
        block = dst.narrow(dim, i * head_size, head_size)
        if source is None:
            block.zero_()
        else:
            _copy_narrowed(block, src.narrow(dim, source * head_size, head_size))


def _zero_heads(dst: torch.Tensor, sources: list[int | None], head_size: int, dim: int) -> None:
    for i, source in enumerate(sources):
        if source is None:
            dst.narrow(dim, i * head_size, head_size).zero_()
