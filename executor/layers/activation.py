"""Activation modules over the `kernels.activation` functions, looked up by HF name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.activation import gelu, gelu_new, relu, silu_and_mul


class SiluAndMul(nn.Module):
    """[T, 2 * I] (gate | up) -> silu(gate) * up, [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class Activation(nn.Module):
    """An elementwise activation kernel as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,  # the same tanh approximation
    "gelu": gelu,
    "relu": relu,
}


def get_act_fn(name: str) -> Activation:
    """The activation an HF config names (activation_function / hidden_act)."""
    fn = _ACTIVATIONS.get(name)
    if fn is None:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return Activation(fn, name)
