"""Model definitions (Llama family, Qwen2/3, OPT, GPT-2) and their registry."""

from executor.models.registry import (
    SUPPORTED_ARCHITECTURES,
    CausalLM,
    architecture_of,
    get_model_class,
    kv_cache_shape_info,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "architecture_of",
    "get_model_class",
    "kv_cache_shape_info",
]
