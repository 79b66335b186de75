"""Qwen2 and Qwen3: members of the Llama family with their own attention details.

Qwen2 has biases on the q/k/v projections (not on o_proj). Qwen3 drops those biases
(unless attention_bias), takes head_dim from the config and RMS-normalizes every q
and k head before rotary.
"""

from __future__ import annotations

from typing import Any

from executor.models.llama import DecoderSpec, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5."""

    @classmethod
    def spec(cls, cfg: dict[str, Any]) -> DecoderSpec:
        return DecoderSpec(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense)."""

    @classmethod
    def spec(cls, cfg: dict[str, Any]) -> DecoderSpec:
        bias = bool(cfg.get("attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias, qk_norm=True)
