"""NVML, the NVIDIA driver's management library, through ctypes: it answers without a
CUDA context, and without torch (engine_core.cuda_devices counts devices with it before
torch is imported).

`process_memory_used` tells what one process holds on a device. The KV cache is sized
from what this worker took outside torch while it profiled (executor/profiling.py), and
the device-wide count of that also holds every process that started beside it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _ProcessInfo(ctypes.Structure):  # nvmlProcessInfo_t (v2 and v3 calls)
    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


_NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE in usedGpuMemory
_INSUFFICIENT_SIZE = 7  # NVML_ERROR_INSUFFICIENT_SIZE: the list grew since it was sized


def ask_nvml(question: Callable[[ctypes.CDLL], T | None]) -> T | None:
    """`question` answered by NVML between its init and shutdown; None where NVML is
    missing or fails to start."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        try:
            return question(nvml)
        finally:
            nvml.nvmlShutdown()
    except (OSError, AttributeError):
        return None


def process_memory_used(uuid: str, pid: int) -> int | None:
    """Device memory process `pid` holds on the device `uuid` ("GPU-..."), as the driver
    counts it (its CUDA context, torch's reserve and every library's own allocations);
    None where NVML cannot tell: no NVML, a MIG slice, or a PID namespace that hides
    `pid` from the driver."""
    return ask_nvml(lambda nvml: _process_memory(nvml, uuid.encode(), pid))


def _process_memory(nvml: ctypes.CDLL, uuid: bytes, pid: int) -> int | None:
    handle = ctypes.c_void_p()
    if nvml.nvmlDeviceGetHandleByUUID(uuid, ctypes.byref(handle)) != 0:
        return None
    for proc in _compute_processes(nvml, handle) or []:
        if proc.pid == pid:
            return None if proc.usedGpuMemory == _NOT_AVAILABLE else int(proc.usedGpuMemory)
    return None


def _compute_processes(nvml: ctypes.CDLL, handle: ctypes.c_void_p) -> list[_ProcessInfo] | None:
    """The device's compute processes, or None if NVML won't list them."""
    ask = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v3", None)
    ask = ask or nvml.nvmlDeviceGetComputeRunningProcesses_v2
    for room in (64, 1024):  # another process may start between sizing and listing
        count = ctypes.c_uint(room)
        infos = (_ProcessInfo * room)()
        status = ask(handle, ctypes.byref(count), infos)
        if status == 0:
            return list(infos[: count.value])
        if status != _INSUFFICIENT_SIZE:
            return None
    return None
