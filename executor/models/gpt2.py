"""GPT-2: learned positions, pre-norm LayerNorm blocks, gelu_new MLP, tied LM head.

GPT-2 checkpoints store their projections as Conv1D weights, [in, out], the
transpose of nn.Linear's [out, in]; load_weights transposes them. c_attn holds q, k
and v merged, and loads through the QKV layer's loader as one tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from executor.layers.activation import get_act_fn
from executor.layers.attention import Attention
from executor.layers.embedding import VocabParallelEmbedding
from executor.layers.linear import (
    ColumnParallelLinear,
    HeadRowParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from executor.layers.norm import LayerNorm
from executor.models.registry import CausalLM, load_named_weights
from executor.pipeline import IntermediateTensors, PPGroup, make_layers

CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# Causal-mask buffers of old checkpoints ("h.N.attn.bias", "h.N.attn.masked_bias").
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _layer_norm(cfg: dict[str, Any], dtype: torch.dtype) -> LayerNorm:
    return LayerNorm(cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5), dtype=dtype)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = cfg["n_embd"], cfg["n_head"]
        head_dim = hidden // heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, heads, True, dtype)
        self.c_proj = HeadRowParallelLinear(self.c_attn.layout, head_dim, hidden, True, dtype)
        self.q_size = self.c_attn.q_size
        scale = head_dim**-0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(
            self.c_attn.num_heads, head_dim, scale, self.c_attn.num_kv_heads, layer_idx
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).split([self.q_size] * 3, dim=-1)  # [T, H D] each
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        hidden = cfg["n_embd"]
        inner = cfg.get("n_inner") or 4 * hidden
        self.c_fc = ColumnParallelLinear(hidden, inner, True, False, dtype)
        self.act = get_act_fn(cfg.get("activation_function", "gelu_new"))
        self.c_proj = RowParallelLinear(inner, hidden, True, True, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = _layer_norm(cfg, dtype)
        self.attn = GPT2Attention(cfg, layer_idx, dtype)
        self.ln_2 = _layer_norm(cfg, dtype)
        self.mlp = GPT2MLP(cfg, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    """The block stack; with pipeline parallelism, this stage's part of it."""

    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype, pp: PPGroup) -> None:
        super().__init__()
        self.wte: VocabParallelEmbedding | None = None
        self.wpe: VocabParallelEmbedding | None = None
        if pp.is_first:
            self.wte = VocabParallelEmbedding(cfg["vocab_size"], cfg["n_embd"], dtype)
            self.wpe = VocabParallelEmbedding(cfg["n_positions"], cfg["n_embd"], dtype)
        self.start_layer, self.end_layer, self.h = make_layers(
            cfg["n_layer"], lambda i: GPT2Block(cfg, i, dtype), pp
        )
        self.ln_f = _layer_norm(cfg, dtype) if pp.is_last else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            assert self.wte is not None and self.wpe is not None
            hidden = self.wte(input_ids) + self.wpe(positions)  # [T, E]
        else:
            hidden = intermediate["hidden"]
        for block in islice(self.h, self.start_layer, self.end_layer):
            hidden = block(hidden)
        if self.ln_f is None:
            return {"hidden": hidden}
        return self.ln_f(hidden)


class GPT2LMHeadModel(CausalLM):
    """GPT-2; the LM head is the token embedding (tied)."""

    FIRST_STAGE_WEIGHTS = ("wte.", "wpe.")
    LAST_STAGE_WEIGHTS = ("ln_f.", "lm_head.")
    EMBEDDING_WEIGHT = "wte.weight"

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__(hf_config, dtype)
        self.transformer = GPT2Model(hf_config, dtype, self.pp)
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", True))
        self.make_lm_head(hf_config["vocab_size"], hf_config["n_embd"], self.transformer.wte)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = MASK_BUFFERS + (("lm_head.weight",) if self.shares_embedding else ())
        return load_named_weights(self, _hf_layout(self.stage_weights(weights)), (), skip)


def _hf_layout(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoint tensors renamed to this model's names, Conv1D weights as [out, in]."""
    for name, tensor in weights:
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # the original gpt2 checkpoints were saved from GPT2Model
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        yield name, tensor
