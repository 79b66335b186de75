"""Rotary-embedding settings read from an HF config dict, without torch.

The engine core checks them at startup (a bad --rope-scaling is refused there, naming
the flag) and the workers' rotary layer builds its frequencies from them; both read
the old (rope_theta + rope_scaling) and the new (rope_parameters) spelling.
"""

from __future__ import annotations

import math
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Scaling types that need a stretch factor (transformers requires factor >= 1).
_FACTOR_REQUIRED = ("linear", "dynamic", "llama3")


def rope_settings(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, scaling dict or None, partial_rotary_factor) from an HF config dict."""
    params = _params(hf_config)
    theta = params.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0
    partial = params.pop("partial_rotary_factor", None) or hf_config.get("partial_rotary_factor")
    rope_type = rope_type_of(params)
    scaling = None if rope_type == "default" else params
    return float(theta), scaling, float(partial or 1.0)


def rope_type_of(params: dict[str, Any]) -> str:
    return params.get("rope_type", params.get("type")) or "default"


def rope_problem(hf_config: dict[str, Any]) -> str | None:
    """Why the config's rotary settings cannot be carried out, or None."""
    params = _params(hf_config)
    theta = params.get("rope_theta", hf_config.get("rope_theta"))
    if theta is not None and not _number_at_least(theta, 0, strict=True):
        return f"rope_theta must be a positive number, got {theta!r}"
    rope_type = rope_type_of(params)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        return f"rope type {rope_type!r} is not supported (supported: {supported})"
    factor = params.get("factor")
    if rope_type in _FACTOR_REQUIRED or (rope_type == "yarn" and factor is not None):
        if not _number_at_least(factor, 1):
            return f"{rope_type} scaling needs a factor >= 1, got {factor!r}"
    return _scaling_keys_problem(rope_type, params)


def _scaling_keys_problem(rope_type: str, params: dict[str, Any]) -> str | None:
    original = params.get("original_max_position_embeddings")
    if original is not None and not (_is_int(original) and original > 0):
        return f"original_max_position_embeddings must be a positive integer, got {original!r}"
    if rope_type == "llama3":
        low: Any = params.get("low_freq_factor")
        high: Any = params.get("high_freq_factor")
        if not (_number_at_least(low, 0, strict=True) and _number_at_least(high, 0, strict=True)):
            return (
                "llama3 scaling needs positive low_freq_factor and high_freq_factor, "
                f"got {low!r} and {high!r}"
            )
        if high <= low:
            return f"llama3 scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}"
    for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        value = params.get(key)
        if value is not None and not _number_at_least(value, 0, strict=True):
            return f"{key} must be a positive number, got {value!r}"
    return None


def _params(hf_config: dict[str, Any]) -> dict[str, Any]:
    params = dict(hf_config.get("rope_scaling") or {})
    params.update(hf_config.get("rope_parameters") or {})
    return params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_at_least(value: Any, low: float, strict: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low
