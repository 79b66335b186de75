"""executor.nvml: one process's device memory as the driver counts it (the KV-cache
sizing uses it so that processes starting beside a worker don't count as its own)."""

from __future__ import annotations

import ctypes

import pytest

from executor import nvml

UUID = b"GPU-ab12"


class FakeNvml:
    """NVML's device handle and process-listing calls, for one device and its processes
    (pid, bytes); `v3=False` is a driver before the v3 call."""

    def __init__(self, procs: list[tuple[int, int]], v3: bool = True) -> None:
        self.procs = procs
        self.calls: list[int] = []  # the room each listing call was given
        if v3:
            self.nvmlDeviceGetComputeRunningProcesses_v3 = self._list

    def nvmlDeviceGetHandleByUUID(self, uuid, handle):  # noqa: N802 (NVML's names)
        return 0 if uuid == UUID else 2  # NVML_ERROR_INVALID_ARGUMENT

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle, count, infos):  # noqa: N802
        return self._list(handle, count, infos)

    def _list(self, handle, count, infos):
        room = count._obj.value
        self.calls.append(room)
        count._obj.value = len(self.procs)
        if room < len(self.procs):
            return 7  # NVML_ERROR_INSUFFICIENT_SIZE
        for info, (pid, used) in zip(infos, self.procs, strict=False):
            info.pid, info.usedGpuMemory = pid, used
        return 0


def test_a_process_reads_its_own_count_among_others():
    fake = FakeNvml([(10, 5 << 30), (42, 3 << 30), (77, 1 << 30)])
    assert nvml._process_memory(fake, UUID, 42) == 3 << 30
    assert nvml._process_memory(fake, UUID, 99) is None  # hidden by a PID namespace, say


def test_no_count_where_the_driver_has_none_or_the_device_is_unknown():
    not_available = (1 << 64) - 1
    assert nvml._process_memory(FakeNvml([(42, not_available)]), UUID, 42) is None
    assert nvml._process_memory(FakeNvml([(42, 1 << 30)]), b"MIG-ff", 42) is None


def test_a_long_process_list_is_asked_again_with_more_room():
    fake = FakeNvml([(pid, pid << 20) for pid in range(1, 101)])
    assert nvml._process_memory(fake, UUID, 100) == 100 << 20
    assert fake.calls == [64, 1024]


def test_a_driver_without_the_v3_call_answers_through_v2():
    fake = FakeNvml([(42, 2 << 30)], v3=False)
    assert not hasattr(fake, "nvmlDeviceGetComputeRunningProcesses_v3")
    assert nvml._process_memory(fake, UUID, 42) == 2 << 30


def test_without_nvml_there_is_no_count_and_no_error():
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        assert nvml.process_memory_used("GPU-ab12", 1) is None
    else:
        pytest.skip("this machine has NVML")
