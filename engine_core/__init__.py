"""Tessera's engine core: `from engine_core import LLM, SamplingParams`."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str) -> Any:
    # Lazy, so that light modules (messages, config) import without loading torch.
    if name == "LLM":
        from engine_core.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine_core.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from engine_core import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
