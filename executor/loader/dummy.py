"""Random weights (`--load-format dummy`) for benchmarks and tests without a checkpoint.

Values are drawn on the parameter's own device (fast for huge shapes on a GPU), from
one generator seeded with the model seed, so the same seed gives the same model.
Norm weights are 1 and norm biases 0; everything else is N(0, 0.02), small enough
that activations stay finite in bfloat16, except the zero heads of tensor-parallel
head padding, which stay 0.
"""

from __future__ import annotations

import torch
from torch import nn

from executor.layers.norm import LayerNorm, RMSNorm

DUMMY_STD = 0.02


def _norm_params(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (RMSNorm, LayerNorm, nn.LayerNorm)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter of the model with reproducible random values."""
    norms = _norm_params(model)
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if id(param) in norms:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
        param.normal_(0.0, DUMMY_STD, generator=gen)
    # Zero heads (tensor-parallel head padding) stay zero, as a checkpoint load leaves
    # them, so padding never changes what the model computes.
    for module in model.modules():
        zero = getattr(module, "zero_padded_heads", None)
        if zero is not None:
            zero()
