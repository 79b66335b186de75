"""Counting CUDA devices without importing torch: NVML, the torch build, the mask."""

from __future__ import annotations

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
