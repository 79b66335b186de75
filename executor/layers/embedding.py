"""Token embeddings and the LM head, sharded over the vocabulary for tensor parallelism.

Rank r holds rows [r * V_r, (r + 1) * V_r) of the table, V_r = ceil(vocab / tp_size);
rows past the real vocabulary are zero padding. The embedding looks up its own rows,
zeroes the others and all-reduces; the LM head computes its slice of the logits and
all-gathers them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from executor.layers.linear import TPGroup, get_tp_group, set_weight_loader
from kernels.skinny_gemm import linear


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows across tensor-parallel ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None else get_tp_group()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // self.tp.size)
        self.vocab_start = self.tp.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim, dtype=dtype), requires_grad=False
        )
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape mismatch: embedding ({self.num_embeddings}, {self.embedding_dim}), "
                f"checkpoint {tuple(loaded_weight.shape)}"
            )
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)  # [T, E]
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)  # [T, E]


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split by vocabulary rows.

    A model with tied embeddings shares the embedding's weight Parameter instead of
    loading its own (see `tie_to`).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype, tp)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(self.rows_per_rank, dtype=self.weight.dtype), requires_grad=False
            )
            set_weight_loader(self.bias, self._bias_loader)

    def _bias_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding table (same sharding, so the same rows on every rank)."""
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, E] hidden states -> [S, vocab] logits in the model's dtype.

        No float32 copy here: the fused sampler reads bf16 logits and widens them in
        registers, and the general sampler and logprobs make their own float32 copy.
        """
        logits = linear(hidden, self.weight, self.bias)  # [S, V_r]
        logits = self.tp.all_gather(logits, dim=-1)  # [S, V_r * tp]
        return logits[:, : self.num_embeddings]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied with compute_logits(), not called")
