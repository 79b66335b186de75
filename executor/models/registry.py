"""What a model is, which ones exist, and the checkpoint-loading helper they share.

Every model is a `CausalLM`: built from an HF config dict and a dtype, it maps the
flattened tokens of a step to hidden states (`forward`), hidden states to float32
logits (`compute_logits`), and takes its weights by HF checkpoint name
(`load_weights`). Model modules are imported lazily, on first use of their
architecture.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from executor.layers.heads import head_layout
from executor.layers.linear import default_weight_loader

# architecture name (HF config "architectures") -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("executor.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("executor.models.qwen", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("executor.models.qwen", "Qwen3ForCausalLM"),
    "OPTForCausalLM": ("executor.models.opt", "OPTForCausalLM"),
    "GPT2LMHeadModel": ("executor.models.gpt2", "GPT2LMHeadModel"),
}

# HF model_type -> architecture, for configs without "architectures" (e.g. read from GGUF)
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)

# (fused parameter part, checkpoint part, shard id), e.g. (".qkv_proj.", ".q_proj.", "q")
StackedParams = Sequence[tuple[str, str, Any]]


class CausalLM(nn.Module):
    """The interface every model implements (see the module docstring)."""

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> hidden [T, hidden]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] float32."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF checkpoint name, tensor) pairs; returns the parameter names filled."""
        raise NotImplementedError


def get_model_class(architecture: str) -> type[CausalLM]:
    """The model class of an HF architecture name; ValueError for an unsupported one."""
    entry = _MODELS.get(architecture)
    if entry is None:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module, name = entry
    cls: type[CausalLM] = getattr(importlib.import_module(module), name)
    return cls


def architecture_of(hf_config: dict[str, Any]) -> str:
    """The supported architecture an HF config names, by "architectures" or model_type."""
    for arch in hf_config.get("architectures") or []:
        if arch in _MODELS:
            return arch
    arch = _MODEL_TYPES.get(hf_config.get("model_type", ""))
    if arch is None:
        named = hf_config.get("architectures") or hf_config.get("model_type")
        raise ValueError(
            f"model architecture {named!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def kv_cache_shape_info(hf_config: dict[str, Any], tp_size: int = 1) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads on one rank, head_dim) for sizing the KV cache.

    The rank's kv heads are those QKVParallelLinear holds: its share of the
    HeadLayout, replicated or zero-padded heads included.
    """
    cfg = hf_config
    num_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    num_heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    if num_layers is None or num_heads is None or hidden is None:
        raise ValueError("HF config lacks num_hidden_layers / num_attention_heads / hidden_size")
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    head_dim = cfg.get("head_dim") or hidden // num_heads
    layout = head_layout(int(num_heads), int(num_kv_heads), tp_size)
    return int(num_layers), layout.local_kv_heads, int(head_dim)


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: StackedParams = (),
    skip: Sequence[str] = (),
) -> set[str]:
    """Copy checkpoint tensors into the model's parameters through their weight loaders.

    A name containing a `stacked` checkpoint part loads into the fused parameter as
    that shard; names containing a `skip` substring are dropped (derived buffers,
    tied weights). Unknown names and parameters left unfilled raise ValueError, so a
    wrong checkpoint fails loudly instead of running on uninitialized memory.
    """
    params = dict(model.named_parameters())
    shards: dict[str, set[Any]] = {}  # parameter -> shard ids loaded (None: the whole)
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard_id = _target_of(name, stacked)
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
        loader = getattr(param, "weight_loader", default_weight_loader)
        with torch.no_grad():
            loader(param, tensor.to(param.device), shard_id)
        shards.setdefault(target, set()).add(shard_id)
    missing = [name for name in params if not _complete(name, shards.get(name), stacked)]
    if missing:
        raise ValueError(f"checkpoint has no tensor for parameters: {', '.join(missing[:8])}")
    return set(shards)


def _complete(name: str, loaded: set[Any] | None, stacked: StackedParams) -> bool:
    # A fused parameter needs every one of its shards, unless it came whole.
    if not loaded:
        return False
    if None in loaded:
        return True
    return loaded == {shard_id for fused, _, shard_id in stacked if fused in name}


def _target_of(name: str, stacked: StackedParams) -> tuple[str, Any]:
    for fused, part, shard_id in stacked:
        if part in name:
            return name.replace(part, fused), shard_id
    return name, None
