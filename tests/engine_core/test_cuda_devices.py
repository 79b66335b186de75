"""Counting CUDA devices without importing torch: NVML, the torch build, the mask."""

from __future__ import annotations

import ctypes

import pytest
import torch

from engine_core import cuda_devices


def test_the_torch_build_is_read_from_its_version_file():
    assert cuda_devices.torch_cuda_version() == torch.version.cuda


def test_a_torch_without_cuda_sees_no_device_whatever_nvml_says(monkeypatch):
    monkeypatch.setattr(cuda_devices, "torch_cuda_version", lambda: None)
    monkeypatch.setattr(cuda_devices, "_nvml_device_count", lambda: 8)
    assert cuda_devices.cuda_device_count() == 0


def test_nvml_count_under_the_visible_devices_mask(monkeypatch):
    monkeypatch.setattr(cuda_devices, "torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(cuda_devices, "_nvml_device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cuda_devices.cuda_device_count() == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert cuda_devices.cuda_device_count() == 2


@pytest.mark.parametrize(
    ("visible", "count"),
    [("", 0), ("-1", 0), ("0,1", 2), ("3", 1), ("1,7,2", 1), ("0,0", 1), ("GPU-ab12,1", 2)],
)
def test_visible_devices_are_read_up_to_the_first_bad_entry(visible, count):
    assert cuda_devices.visible_count(visible, 4) == count


def test_without_nvml_torch_answers(monkeypatch):
    monkeypatch.setattr(cuda_devices, "torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(cuda_devices, "_nvml_device_count", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert cuda_devices.cuda_device_count() == 3


class FakeNvml:
    """NVML's four calls behind first_device_info, answering for one device."""

    def __init__(self, index: int, uuid: str) -> None:
        self.index, self.uuid = index, uuid

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):  # noqa: N802 (NVML's names)
        return 0 if index == self.index else 2

    def nvmlDeviceGetHandleByUUID(self, uuid, handle):  # noqa: N802
        return 0 if uuid == self.uuid.encode() else 2

    def nvmlDeviceGetMemoryInfo(self, handle, memory):  # noqa: N802
        memory._obj.total = 80 << 30
        return 0

    def nvmlDeviceGetName(self, handle, name, length):  # noqa: N802
        ctypes.memmove(name, b"NVIDIA H100 80GB HBM3\0", 22)
        return 0


@pytest.mark.parametrize(("first", "found"), [("1", True), ("GPU-ab12", True), ("0", False)])
def test_device_info_of_the_first_visible_device(first, found):
    info = cuda_devices._device_info(FakeNvml(1, "GPU-ab12"), first)
    expected = cuda_devices.DeviceInfo(80 << 30, "NVIDIA H100 80GB HBM3")
    assert info == (expected if found else None)


def test_no_device_no_info(monkeypatch):
    cuda_devices.first_device_info.cache_clear()
    monkeypatch.setattr(cuda_devices, "torch_cuda_version", lambda: None)
    assert cuda_devices.first_device_info() is None
    cuda_devices.first_device_info.cache_clear()
