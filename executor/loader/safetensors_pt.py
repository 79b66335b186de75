"""Checkpoint tensors from the safetensors or PyTorch .bin files of an HF model folder."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

SAFETENSORS_INDEX = "model.safetensors.index.json"
# .bin files in model folders that hold no weights
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin")


def _ignored(path: Path, folder: Path, ignore_patterns: Sequence[str]) -> bool:
    rel = path.relative_to(folder).as_posix()
    return any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns)


def find_safetensors_files(folder: Path, ignore_patterns: Sequence[str] = ()) -> list[Path]:
    """The folder's *.safetensors files; only those its index names when it has one.

    The index matters where a folder also holds a consolidated copy of the same
    weights (e.g. consolidated.safetensors next to model-0000N-of-M.safetensors).
    """
    files = sorted(
        p for p in folder.glob("*.safetensors") if not _ignored(p, folder, ignore_patterns)
    )
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        files = [p for p in files if p.name in listed]
    return files


def find_pt_files(folder: Path, ignore_patterns: Sequence[str] = ()) -> list[Path]:
    """The folder's PyTorch weight files (*.bin, *.pt), leaving out training state."""
    files = [*folder.glob("*.bin"), *folder.glob("*.pt")]
    return sorted(
        p for p in files if p.name not in NOT_WEIGHTS and not _ignored(p, folder, ignore_patterns)
    )


def iter_safetensors(
    files: Sequence[Path], use_tqdm: bool = True, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files (that `keep` accepts; the others
    are not read), one tensor in memory at a time."""
    for path in tqdm(files, desc="Loading safetensors", unit="file", disable=not use_tqdm):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if keep is None or keep(name):
                    yield name, f.get_tensor(name)


def iter_pt(
    files: Sequence[Path], use_tqdm: bool = True, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of PyTorch state-dict files (weights_only load)
    that `keep` accepts."""
    for path in tqdm(files, desc="Loading pt checkpoint", unit="file", disable=not use_tqdm):
        state = torch.load(path, map_location="cpu", weights_only=True)
        yield from ((k, v) for k, v in state.items() if keep is None or keep(k))
        del state
