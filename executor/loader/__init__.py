"""Build a model from the engine config and fill its weights.

load_format picks the source: "auto" (a GGUF file when one is configured, else the
folder's safetensors files, else its PyTorch *.bin / *.pt files), "safetensors",
"pt", "gguf", or "dummy" (random, reproducible with the model seed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from executor.config import EngineConfig, ModelConfig
from executor.loader.dummy import init_dummy_weights
from executor.loader.gguf import iter_gguf
from executor.loader.kv_scales import apply_kv_scales, split_kv_scales
from executor.loader.safetensors_pt import (
    find_pt_files,
    find_safetensors_files,
    iter_pt,
    iter_safetensors,
)
from executor.models.registry import CausalLM, get_model_class

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}

Weights = Iterator[tuple[str, torch.Tensor]]
KeepName = Callable[[str], bool]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved ModelConfig.dtype string."""
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        raise ValueError(
            f"dtype {name!r} is not a resolved model dtype; one of {list(_TORCH_DTYPES)}"
        )
    return dtype


def model_hf_config(model: ModelConfig) -> dict[str, Any]:
    """The HF config dict the model is built from, with engine-level switches applied."""
    if not model.hf_config:
        raise ValueError(f"ModelConfig for {model.model!r} carries no hf_config")
    cfg = dict(model.hf_config)
    if model.disable_sliding_window:
        cfg["sliding_window"] = None
    return cfg


def load_model(config: EngineConfig, device: torch.device) -> CausalLM:
    """Build the configured model in its dtype on `device` and load its weights."""
    mc = config.model
    model_cls = get_model_class(mc.architecture)
    with torch.device(device):
        model = model_cls(model_hf_config(mc), torch_dtype(mc.dtype))
    if config.load.load_format == "dummy":
        init_dummy_weights(model, mc.seed)
    else:
        # only this pipeline stage's tensors are read (all of them without PP)
        scales: dict[tuple[int, str], float] = {}
        weights = checkpoint_weights(config, model.keeps_weight)
        model.load_weights(split_kv_scales(weights, scales))
        apply_kv_scales(model, scales, config.cache.cache_dtype.startswith("fp8"))
    return model.eval()


def checkpoint_weights(config: EngineConfig, keep: KeepName | None = None) -> Weights:
    """(HF name, tensor) pairs of the configured checkpoint, whatever its format.

    With `keep`, tensors whose name it rejects are not read at all.
    """
    fmt = config.load.load_format
    use_tqdm = config.load.use_tqdm_on_load
    ignore = config.load.ignore_patterns
    if fmt not in LOAD_FORMATS:
        raise ValueError(f"load format {fmt!r} is not supported; supported: {LOAD_FORMATS}")
    gguf_path = find_gguf_file(config.model)
    if fmt == "gguf" or (fmt == "auto" and gguf_path is not None):
        if gguf_path is None:
            raise FileNotFoundError(f"load format gguf: no .gguf file at {config.model.model_path}")
        return iter_gguf(gguf_path, use_tqdm, keep)
    folder = _model_folder(config.model)
    if fmt in ("auto", "safetensors"):
        files = find_safetensors_files(folder, ignore)
        if files:
            return iter_safetensors(files, use_tqdm, keep)
        if fmt == "safetensors":
            raise FileNotFoundError(f"no *.safetensors weight files in {folder}")
    files = find_pt_files(folder, ignore)
    if not files:
        looked_for = "*.safetensors, *.bin or *.pt" if fmt == "auto" else "*.bin or *.pt"
        raise FileNotFoundError(f"no weight files ({looked_for}) in {folder}")
    return iter_pt(files, use_tqdm, keep)


def find_gguf_file(model: ModelConfig) -> Path | None:
    """The GGUF file to load: gguf_file (absolute, or inside model_path), or model_path."""
    if model.gguf_file:
        path = Path(model.gguf_file)
        if not path.is_absolute() and Path(model.model_path).is_dir():
            path = Path(model.model_path) / path
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    if model.model_path.endswith(".gguf"):
        path = Path(model.model_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    return None


def _model_folder(model: ModelConfig) -> Path:
    folder = Path(model.model_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    return folder


__all__ = ["LOAD_FORMATS", "checkpoint_weights", "find_gguf_file", "load_model", "torch_dtype"]
