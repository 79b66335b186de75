"""Checkpoint tensors from a GGUF file, dequantized to float32 under their HF names.

llama.cpp's converter reorders the rows of the q and k projections of llama-type
models (each head's two rotary halves interleaved, for its GPT-J style rope); we
undo that so the weights fit the HF (neox style) layout our models use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from executor.loader.gguf_file import GGUFFile, GGUFTensor

# Architectures whose q/k rows llama.cpp permuted at conversion.
PERMUTED_QK_ARCHS = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors that describe rope (derived from the config on our side), not weights.
_SKIPPED = ("rope_freqs.weight",)
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    """The HF checkpoint name of a GGUF tensor name; ValueError for an unknown one."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL.match(gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF name")


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head [pair, half] back to HF's [half, pair]."""
    rows = weight.shape[0]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def _dequantized(tensor: GGUFTensor) -> torch.Tensor:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # numpy, HF [out, in] order
    if not data.flags.writeable:  # F32/F16 tensors come back as views of the memory map
        data = data.copy()
    return torch.from_numpy(data.astype(np.float32, copy=False))


def iter_gguf(
    path: str | Path, use_tqdm: bool = True, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight of a GGUF file (that `keep` accepts)."""
    reader = GGUFFile(path)
    arch = reader.fields.get("general.architecture")
    num_heads = int(reader.fields.get(f"{arch}.attention.head_count", 0))
    num_kv_heads = int(reader.fields.get(f"{arch}.attention.head_count_kv") or num_heads)
    permuted = arch in PERMUTED_QK_ARCHS
    for tensor in tqdm(reader.tensors, desc="Loading GGUF", unit="tensor", disable=not use_tqdm):
        if tensor.name in _SKIPPED:
            continue
        name = hf_name(tensor.name)
        if keep is not None and not keep(name):
            continue  # another pipeline stage's tensor: not dequantized
        weight = _dequantized(tensor)
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_qk(weight, num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_qk(weight, num_kv_heads)
        yield name, weight
