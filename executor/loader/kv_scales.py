"""Per-layer FP8 KV-cache scales: read from the checkpoint, or computed on the first step.

An FP8 cache stores `value / scale` per tensor. FP8 checkpoints carry the scales as
scalars next to the attention weights (`...self_attn.k_scale`, `...self_attn.attn.k_scale`,
or the older `...k_proj.output_scale`); `--calculate-kv-scales` instead takes them from
the keys and values of the first step that runs. Without either, every scale is 1.0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from executor.layers.attention import Attention

logger = logging.getLogger(__name__)

# layer index, "k" or "v"
_SCALE_NAME = re.compile(r"layers\.(\d+)\..*(?:([kv])_scale|([kv])_proj\.output_scale)$")


def split_kv_scales(
    weights: Iterable[tuple[str, torch.Tensor]], found: dict[tuple[int, str], float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the weights on, keeping the KV scale scalars out (into `found`)."""
    for name, tensor in weights:
        match = _SCALE_NAME.search(name)
        if match is None:
            yield name, tensor
            continue
        kind = match.group(2) or match.group(3)
        found[(int(match.group(1)), kind)] = float(tensor.float().max())


def apply_kv_scales(model: nn.Module, found: dict[tuple[int, str], float], fp8: bool) -> None:
    """Give each attention layer its checkpoint scales (only an FP8 cache uses them)."""
    if not found:
        return
    if not fp8:
        logger.info("checkpoint KV scales not used: the KV cache is not FP8")
        return
    for layer in attention_layers(model):
        layer.k_scale = found.get((layer.layer_idx, "k"), layer.k_scale)
        layer.v_scale = found.get((layer.layer_idx, "v"), layer.v_scale)
    logger.info("KV cache scales from the checkpoint for %d layers", len(found) // 2)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]
