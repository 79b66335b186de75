"""Checks of --hf-overrides against the model config it changes.

A value of the wrong kind would otherwise get through startup and fail deep inside
a worker (a string layer count, a float vocabulary size), far from the flag that
caused it. The sizes the models read must be positive integers; any other key
keeps the kind of value the model's config gives it (numbers stay finite numbers).
"""

from __future__ import annotations

import math
from typing import Any

# Keys that hold a model's context length, in vLLM's order; the smallest present wins.
CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# Config keys the models read as sizes; those in NULLABLE may also be null (unset).
SIZE_KEYS = frozenset(
    {
        "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
        "n_head", "num_key_value_heads", "intermediate_size", "ffn_dim", "n_inner",
        "vocab_size", "head_dim", "sliding_window", "word_embed_proj_dim",
        *CONTEXT_LENGTH_KEYS,
    }
)  # fmt: skip
NULLABLE = frozenset({"n_inner", "head_dim", "sliding_window", "num_key_value_heads"})
# Checked as rotary settings once merged (engine_core.config).
ROPE_KEYS = frozenset({"rope_scaling", "rope_theta", "rope_parameters"})


def override_problem(
    base: dict[str, Any], overrides: dict[str, Any], prefix: str = ""
) -> str | None:
    """Why `overrides` cannot be merged into the config `base`, or None."""
    for key, value in overrides.items():
        name = prefix + str(key)
        if not prefix and key in ROPE_KEYS:
            continue
        if not prefix and key in SIZE_KEYS:
            if not (_is_int(value) and value > 0) and not (value is None and key in NULLABLE):
                return f"{name} must be a positive integer, got {value!r}"
            continue
        problem = _kind_problem(name, base.get(key), value)
        if problem:
            return problem
    return None


def _kind_problem(name: str, old: Any, value: Any) -> str | None:
    if _is_number(value) and not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if old is None or value is None:
        return None
    if isinstance(old, dict) and isinstance(value, dict):
        return override_problem(old, value, prefix=name + ".")
    if _kind(old) != _kind(value):
        return f"{name} must be {_kind(old)} like the model config's {old!r}, got {value!r}"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
