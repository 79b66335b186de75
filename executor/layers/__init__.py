"""Shared model layers: TP-sharded linears and embeddings, attention, rotary, norms."""

from executor.layers.activation import SiluAndMul, get_act_fn
from executor.layers.attention import Attention
from executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from executor.layers.heads import HeadLayout, head_layout
from executor.layers.linear import (
    ColumnParallelLinear,
    HeadRowParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    TPGroup,
    default_weight_loader,
    get_tp_group,
    set_tp_group,
)
from executor.layers.norm import LayerNorm, RMSNorm
from executor.layers.rotary import RotaryEmbedding
from executor.rope_config import rope_settings

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "HeadLayout",
    "HeadRowParallelLinear",
    "LayerNorm",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "TPGroup",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "get_act_fn",
    "get_tp_group",
    "head_layout",
    "rope_settings",
    "set_tp_group",
]
