"""The Llama family decoder (Llama 2/3, Mistral), also the base of Qwen2 and Qwen3.

Pre-norm decoder layers: RMSNorm -> attention with rotary -> RMSNorm -> SwiGLU MLP,
with the residual stream carried through the fused add+norm. The variations of the
family (biases, per-head q/k norms, sliding windows) are switched by `DecoderSpec`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn

from executor.layers.activation import SiluAndMul
from executor.layers.attention import Attention
from executor.layers.embedding import VocabParallelEmbedding
from executor.layers.linear import (
    HeadRowParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from executor.layers.norm import RMSNorm
from executor.layers.rotary import RotaryEmbedding
from executor.models.registry import CausalLM, load_named_weights
from executor.pipeline import IntermediateTensors, PPGroup, make_layers
from executor.rope_config import rope_settings

# Checkpoint q/k/v and gate/up tensors load as shards of the fused projections.
STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)
# Rotary buffers some checkpoints carry; ours are computed from the config.
ROTARY_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True)
class DecoderSpec:
    """How one member of the family differs from plain Llama."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before rotary
    tie_word_embeddings: bool = False  # the default when the config does not say


def head_dim_of(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def layer_sliding_windows(cfg: dict[str, Any]) -> list[int]:
    """Per layer: the sliding window in tokens, 0 for full attention.

    Mistral: every layer when sliding_window is set. Qwen2/3: only with
    use_sliding_window, on the layers layer_types (or max_window_layers) marks.
    """
    num_layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") or 0
    if cfg.get("use_sliding_window") is False or not window:
        return [0] * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else 0 for t in layer_types]
    if "max_window_layers" in cfg:
        return [window if i >= cfg["max_window_layers"] else 0 for i in range(num_layers)]
    return [window] * num_layers


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: dict[str, Any],
        spec: DecoderSpec,
        layer_idx: int,
        sliding_window: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        total_kv_heads = cfg.get("num_key_value_heads") or total_heads
        self.head_dim = head_dim_of(cfg)
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, total_heads, total_kv_heads, spec.qkv_bias, dtype
        )
        self.o_proj = HeadRowParallelLinear(
            self.qkv_proj.layout, self.head_dim, hidden, spec.o_bias, dtype
        )
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if spec.qk_norm:
            eps = cfg.get("rms_norm_eps", 1e-6)
            self.q_norm = RMSNorm(self.head_dim, eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, eps, dtype)
        theta, scaling, partial = rope_settings(cfg)
        self.rotary_emb = RotaryEmbedding(
            self.head_dim,
            int(self.head_dim * partial),
            cfg.get("max_position_embeddings", 2048),
            theta,
            is_neox=True,
            scaling=scaling,
        )
        self.attn = Attention(
            self.qkv_proj.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.qkv_proj.num_kv_heads,
            layer_idx,
            sliding_window=sliding_window,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hk) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        kv = self.attn.cache_write(v)  # the rotary kernel stores k and v in the cache
        if self.q_norm is not None and self.k_norm is not None:
            # q, k: [T, H D], [T, Hk D]; normed per head and rotated in place, one launch
            self.rotary_emb.rotate_normed(positions, q, k, self.q_norm, self.k_norm, kv)
        else:
            q, k = self.rotary_emb(positions, q, k, kv)
        return self.o_proj(self.attn(q, k, v, kv_written=kv is not None))  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any], spec: DecoderSpec, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported by the Llama MLP (silu only)")
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [inter, inter], spec.mlp_bias, False, dtype
        )
        self.down_proj = RowParallelLinear(inter, hidden, spec.mlp_bias, True, dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: dict[str, Any],
        spec: DecoderSpec,
        layer_idx: int,
        sliding_window: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, spec, layer_idx, sliding_window, dtype)
        self.mlp = LlamaMLP(cfg, spec, dtype)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)  # type: ignore[assignment]
        else:
            hidden, residual = self.input_layernorm(hidden, residual)  # type: ignore[misc]
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)  # type: ignore[misc]
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder stack; with pipeline parallelism, this stage's part of it."""

    def __init__(
        self, cfg: dict[str, Any], spec: DecoderSpec, dtype: torch.dtype, pp: PPGroup
    ) -> None:
        super().__init__()
        self.embed_tokens: VocabParallelEmbedding | None = None
        if pp.is_first:
            self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"], dtype)
        windows = layer_sliding_windows(cfg)
        self.start_layer, self.end_layer, self.layers = make_layers(
            cfg["num_hidden_layers"],
            lambda i: LlamaDecoderLayer(cfg, spec, i, windows[i], dtype),
            pp,
        )
        self.norm: RMSNorm | None = None
        if pp.is_last:
            self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6), dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        residual: torch.Tensor | None
        if intermediate is None:
            assert self.embed_tokens is not None
            hidden = self.embed_tokens(input_ids)  # [T, hidden]
            residual = None
        else:
            hidden, residual = intermediate["hidden"], intermediate["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden, residual = layer(positions, hidden, residual)
        if self.norm is None:
            assert residual is not None  # every stage runs at least one layer
            return {"hidden": hidden, "residual": residual}
        hidden, _ = self.norm(hidden, residual)  # type: ignore[misc]
        return hidden


class LlamaForCausalLM(CausalLM):
    """Llama 2/3 (and the base of Mistral, Qwen2, Qwen3)."""

    FIRST_STAGE_WEIGHTS = ("embed_tokens.",)
    LAST_STAGE_WEIGHTS = ("model.norm.", "lm_head.")
    PP_TENSORS = ("hidden", "residual")

    @classmethod
    def spec(cls, cfg: dict[str, Any]) -> DecoderSpec:
        bias = bool(cfg.get("attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__(hf_config, dtype)
        spec = self.spec(hf_config)
        self.model = LlamaModel(hf_config, spec, dtype, self.pp)
        self.tie_word_embeddings = bool(
            hf_config.get("tie_word_embeddings", spec.tie_word_embeddings)
        )
        self.make_lm_head(
            hf_config["vocab_size"], hf_config["hidden_size"], self.model.embed_tokens
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ROTARY_BUFFERS + (("lm_head.weight",) if self.shares_embedding else ())
        return load_named_weights(self, self.stage_weights(weights), STACKED_PARAMS, skip)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with sliding-window attention on every layer."""
