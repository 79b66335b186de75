"""Gated and plain activations. References here; Triton kernels share the signatures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2 * I] (gate | up) -> [T, I]
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_new_ref(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def relu_ref(x: torch.Tensor) -> torch.Tensor:
    # OPT uses plain ReLU
    return F.relu(x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return gelu_new_ref(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return gelu_ref(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    return relu_ref(x)
