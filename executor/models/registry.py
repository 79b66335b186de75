"""What a model is, which ones exist, and the checkpoint-loading helper they share.

Every model is a `CausalLM`: built from an HF config dict and a dtype, it maps the
flattened tokens of a step to hidden states (`forward`), hidden states to float32
logits (`compute_logits`), and takes its weights by HF checkpoint name
(`load_weights`). Model modules are imported lazily, on first use of their
architecture.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from executor.layers.heads import head_layout
from executor.layers.linear import default_weight_loader
from executor.pipeline import IntermediateTensors, get_pp_group

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


# The layer number in a checkpoint name: "model.layers.3.", "decoder.layers.3.", "h.3."
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


class CausalLM(nn.Module):
    """The interface every model implements (see the module docstring).

    With pipeline parallelism a model holds only its stage's part (see
    executor/pipeline.py): `start_layer`..`end_layer`, the embedding on the first
    stage, the final norm and LM head on the last. The class attributes below say
    which checkpoint tensors belong to which stage.
    """

    # Checkpoint-name parts of the tensors only the first / last stage holds.
    FIRST_STAGE_WEIGHTS: tuple[str, ...] = ("embed_tokens.",)
    LAST_STAGE_WEIGHTS: tuple[str, ...] = ("lm_head.",)
    # The token embedding table: a tied LM head on a stage without it loads it itself.
    EMBEDDING_WEIGHT = "embed_tokens.weight"
    # What one stage hands the next, each [T, hidden] (see empty_intermediate).
    PP_TENSORS: tuple[str, ...] = ("hidden",)
    tie_word_embeddings = False

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.dtype = dtype
        self.pp = get_pp_group()
        self.start_layer, self.end_layer = self.pp.layer_range(num_layers_of(hf_config))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """input_ids [T] int64, positions [T] int64 -> hidden [T, hidden].

        A stage after the first takes the previous stage's `intermediate` instead of
        embedding input_ids; a stage before the last returns its intermediate tensors.
        """
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] in the model's dtype."""
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        return self.lm_head.compute_logits(hidden)

    def make_lm_head(
        self, vocab_size: int, width: int, embedding: VocabParallelEmbedding | None
    ) -> None:
        """The LM head, on the last stage only; tied to `embedding` when this stage
        holds both (set tie_word_embeddings first)."""
        self.lm_head: ParallelLMHead | None = None
        if self.pp.is_last:
            self.lm_head = ParallelLMHead(vocab_size, width, False, self.dtype)
        if self.shares_embedding:
            assert self.lm_head is not None and embedding is not None
            self.lm_head.tie_to(embedding)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF checkpoint name, tensor) pairs; returns the parameter names filled."""
        raise NotImplementedError

    # ---- pipeline stages ----------------------------------------------------------
    @property
    def head_takes_embedding(self) -> bool:
        """A tied LM head on a last stage that has no embedding loads the table itself."""
        return self.tie_word_embeddings and self.pp.is_last and not self.pp.is_first

    @property
    def shares_embedding(self) -> bool:
        """The LM head is this stage's embedding Parameter (checkpoint lm_head is skipped)."""
        return self.tie_word_embeddings and self.pp.is_first and self.pp.is_last

    def keeps_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this stage (always, without PP)."""
        if self.pp.size == 1:
            return True
        m = _LAYER_INDEX.search(name)
        if m:
            return self.start_layer <= int(m.group(1)) < self.end_layer
        if self.head_takes_embedding and name.endswith(self.EMBEDDING_WEIGHT):
            return True
        if any(part in name for part in self.FIRST_STAGE_WEIGHTS):
            return self.pp.is_first
        if any(part in name for part in self.LAST_STAGE_WEIGHTS):
            return self.pp.is_last
        return True

    def stage_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """This stage's checkpoint tensors; the embedding goes to a tied head without it."""
        if self.pp.size == 1:
            yield from weights
            return
        for name, tensor in weights:
            if not self.keeps_weight(name):
                continue
            if self.head_takes_embedding and name.endswith(self.EMBEDDING_WEIGHT):
                name = "lm_head.weight"
            yield name, tensor

    def empty_intermediate(self, num_tokens: int, device: torch.device) -> IntermediateTensors:
        """Buffers for what the previous stage sends: PP_TENSORS, each [T, hidden]."""
        cfg = self.hf_config
        width = int(cfg.get("hidden_size") or cfg["n_embd"])
        return {
            name: torch.empty(num_tokens, width, dtype=self.dtype, device=device)
            for name in self.PP_TENSORS
        }


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


def num_layers_of(hf_config: dict[str, Any]) -> int:
    layers = hf_config.get("num_hidden_layers", hf_config.get("n_layer"))
    if layers is None:
        raise ValueError("HF config lacks num_hidden_layers (n_layer)")
    return int(layers)


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
