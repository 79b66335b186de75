"""kernels.dispatch: the one place that picks Triton or the reference."""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import ENV_VAR, HAS_TRITON, kernel_mode, use_triton


def test_cpu_tensors_use_references_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert kernel_mode() == "auto"
    assert use_triton(torch.zeros(1)) is False


def test_env_var_forces_a_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "triton")
    assert use_triton(torch.zeros(1)) is HAS_TRITON
    monkeypatch.setenv(ENV_VAR, "REF")
    assert use_triton(torch.zeros(1)) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_triton_unless_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert use_triton(torch.zeros(1, device="cuda")) is HAS_TRITON
    monkeypatch.setenv(ENV_VAR, "ref")
    assert use_triton(torch.zeros(1, device="cuda")) is False


def test_bad_env_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        use_triton(torch.zeros(1))
