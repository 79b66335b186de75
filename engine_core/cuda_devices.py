"""How many CUDA devices torch will see, answered without importing torch.

`resolve_config` runs first thing in the API server, and importing torch there only to
ask `torch.cuda.is_available()` cost seconds of every start (2.5 s on a slow CPU, more
with a CUDA build). Like vLLM's platform detection, this asks NVML, the driver's
management library, through ctypes, which creates no CUDA context; a torch built
without CUDA sees no device whatever NVML says. Where NVML cannot answer (no
libnvidia-ml, as in a container given only the compute libraries) torch is asked.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from executor.nvml import ask_nvml

_UNKNOWN = "unknown"
_NAME_LEN = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE


class DeviceInfo(NamedTuple):
    total_memory: int  # bytes
    name: str


class _MemoryInfo(ctypes.Structure):  # nvmlMemory_t
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


def cuda_device_count() -> int:
    """The CUDA devices visible to torch in this process (CUDA_VISIBLE_DEVICES applied)."""
    if torch_cuda_version() is None:
        return 0
    count = _nvml_device_count()
    if count is None:
        import torch

        return torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return count if visible is None else visible_count(visible, count)


def torch_cuda_version() -> str | None:
    """torch.version.cuda read from the installed torch's version.py (None: a CPU build),
    or "unknown" when that file cannot be read."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None  # no torch at all: no CUDA either
    try:
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return _UNKNOWN
    for node in tree.body:
        target: ast.expr
        value: ast.expr | None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(value, ast.Constant):
            if isinstance(value.value, (str, type(None))):
                return value.value
    return _UNKNOWN


def visible_count(visible: str, physical: int) -> int:
    """Devices CUDA_VISIBLE_DEVICES=`visible` leaves of `physical` ones: like CUDA, the
    list is read up to its first entry that names no device ("" and "-1" hide all)."""
    count = 0
    seen: set[str] = set()
    for entry in (e.strip() for e in visible.split(",")):
        by_index = entry.isdigit() and int(entry) < physical
        by_uuid = entry.startswith(("GPU-", "MIG-"))
        if not (by_index or by_uuid) or entry in seen:
            break
        seen.add(entry)
        count += 1
    return min(count, physical)


@functools.cache  # asked up to three times by one resolve_config; GPUs stay put
def _nvml_device_count() -> int | None:
    def count_devices(nvml: ctypes.CDLL) -> int | None:
        count = ctypes.c_uint(0)
        ok = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
        return int(count.value) if ok else None

    return ask_nvml(count_devices)


@functools.cache
def first_device_info() -> DeviceInfo | None:
    """Memory and name of the first CUDA device torch will see (CUDA_VISIBLE_DEVICES
    applied), from NVML; None where NVML cannot tell or torch sees no device.
    vLLM picks its default batch budgets from these two."""
    if cuda_device_count() == 0:
        return None
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return ask_nvml(lambda nvml: _device_info(nvml, first))


def _device_info(nvml: ctypes.CDLL, first: str) -> DeviceInfo | None:
    handle = ctypes.c_void_p()
    if first.isdigit():
        found = nvml.nvmlDeviceGetHandleByIndex_v2(int(first), ctypes.byref(handle))
    else:  # a UUID; CUDA also takes a unique prefix of one, NVML only the whole
        found = nvml.nvmlDeviceGetHandleByUUID(first.encode(), ctypes.byref(handle))
    memory = _MemoryInfo()
    name = ctypes.create_string_buffer(_NAME_LEN)
    if (
        found != 0
        or nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0
        or nvml.nvmlDeviceGetName(handle, name, ctypes.c_uint(_NAME_LEN)) != 0
    ):
        return None
    return DeviceInfo(int(memory.total), name.value.decode(errors="replace"))
