"""OPT (facebook/opt-*): learned positions, LayerNorm, ReLU MLP.

Position p reads row p + 2 of the position table (OPT reserves the first two rows).
do_layer_norm_before picks pre-norm (most sizes) or post-norm (opt-350m); when the
word embedding is narrower than the model (word_embed_proj_dim), project_in/out map
between the two.
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
    ReplicatedLinear,
    RowParallelLinear,
)
from executor.layers.norm import LayerNorm
from executor.models.registry import CausalLM, load_named_weights
from executor.pipeline import IntermediateTensors, PPGroup, make_layers

POSITION_OFFSET = 2

STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
)


def _layer_norm(cfg: dict[str, Any], dtype: torch.dtype) -> LayerNorm:
    affine = cfg.get("layer_norm_elementwise_affine", True)
    return LayerNorm(cfg["hidden_size"], 1e-5, affine, affine, dtype)


class OPTAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = hidden // heads
        bias = cfg.get("enable_bias", True)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, heads, bias, dtype)
        self.out_proj = HeadRowParallelLinear(self.qkv_proj.layout, head_dim, hidden, bias, dtype)
        self.q_size = self.qkv_proj.q_size
        self.attn = Attention(
            self.qkv_proj.num_heads, head_dim, head_dim**-0.5, self.qkv_proj.num_kv_heads, layer_idx
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1)  # [T, H D] each
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, ffn = cfg["hidden_size"], cfg["ffn_dim"]
        bias = cfg.get("enable_bias", True)
        self.pre_norm = cfg.get("do_layer_norm_before", True)
        self.self_attn = OPTAttention(cfg, layer_idx, dtype)
        self.self_attn_layer_norm = _layer_norm(cfg, dtype)
        self.fc1 = ColumnParallelLinear(hidden, ffn, bias, False, dtype)
        self.activation_fn = get_act_fn(cfg.get("activation_function", "relu"))
        self.fc2 = RowParallelLinear(ffn, hidden, bias, True, dtype)
        self.final_layer_norm = _layer_norm(cfg, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = hidden
        if self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.activation_fn(self.fc1(hidden)))
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden  # [T, hidden]


class OPTDecoder(nn.Module):
    """The decoder stack; with pipeline parallelism, this stage's part of it."""

    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype, pp: PPGroup) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        word_dim = cfg.get("word_embed_proj_dim") or hidden
        max_pos = cfg["max_position_embeddings"] + POSITION_OFFSET
        self.embed_tokens: VocabParallelEmbedding | None = None
        self.embed_positions: VocabParallelEmbedding | None = None
        self.project_in: ReplicatedLinear | None = None
        self.project_out: ReplicatedLinear | None = None
        if pp.is_first:
            self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], word_dim, dtype)
            self.embed_positions = VocabParallelEmbedding(max_pos, hidden, dtype)
            if word_dim != hidden:
                self.project_in = ReplicatedLinear(word_dim, hidden, False, dtype)
        if pp.is_last and word_dim != hidden:
            self.project_out = ReplicatedLinear(hidden, word_dim, False, dtype)
        self.final_layer_norm: LayerNorm | None = None
        pre_norm = cfg.get("do_layer_norm_before", True)
        if pp.is_last and pre_norm and not cfg.get("_remove_final_layer_norm"):
            self.final_layer_norm = _layer_norm(cfg, dtype)
        self.is_last = pp.is_last
        self.start_layer, self.end_layer, self.layers = make_layers(
            cfg["num_hidden_layers"], lambda i: OPTDecoderLayer(cfg, i, dtype), pp
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            hidden = self._embed(input_ids, positions)
        else:
            hidden = intermediate["hidden"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden = layer(hidden)
        if not self.is_last:
            return {"hidden": hidden}
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)  # [T, word_dim]
        return hidden

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None and self.embed_positions is not None
        hidden = self.embed_tokens(input_ids)  # [T, word_dim]
        if self.project_in is not None:
            hidden = self.project_in(hidden)  # [T, hidden]
        return hidden + self.embed_positions(positions + POSITION_OFFSET)


class OPTModel(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype, pp: PPGroup) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg, dtype, pp)


class OPTForCausalLM(CausalLM):
    """OPT; the LM head shares the token embedding unless tie_word_embeddings is false."""

    FIRST_STAGE_WEIGHTS = ("embed_tokens.", "embed_positions.", "project_in.")
    LAST_STAGE_WEIGHTS = ("decoder.final_layer_norm.", "project_out.", "lm_head.")

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__(hf_config, dtype)
        self.model = OPTModel(hf_config, dtype, self.pp)
        word_dim = hf_config.get("word_embed_proj_dim") or hf_config["hidden_size"]
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", True))
        self.make_lm_head(hf_config["vocab_size"], word_dim, self.model.decoder.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model.decoder(input_ids, positions, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.weight",) if self.shares_embedding else ()
        return load_named_weights(
            self, _with_model_prefix(self.stage_weights(weights)), STACKED_PARAMS, skip
        )


def _with_model_prefix(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterable[tuple[str, torch.Tensor]]:
    # facebook/opt-* checkpoints were saved from OPTModel: "decoder.*", not "model.decoder.*".
    for name, tensor in weights:
        yield ("model." + name if name.startswith("decoder.") else name), tensor
