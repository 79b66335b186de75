"""kernels.dispatch: the one place that picks Triton or the reference."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import kernels as kernels_pkg
from kernels.dispatch import (
    ENV_VAR,
    HAS_TRITON,
    PDL_ENV_VAR,
    _pdl_on,
    kernel_mode,
    pdl_launch,
    use_triton,
)


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


def test_no_programmatic_launch_off_cuda_or_when_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pdl_launch(torch.zeros(1)) == {"PDL": False, "launch_pdl": False}
    if torch.cuda.is_available():
        _pdl_on.cache_clear()
        monkeypatch.setenv(PDL_ENV_VAR, "0")
        assert pdl_launch(torch.zeros(1, device="cuda"))["launch_pdl"] is False
        _pdl_on.cache_clear()


def _jit_kernels() -> dict[str, ast.FunctionDef]:
    kernels = {}
    for path in sorted(Path(kernels_pkg.__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.decorator_list:
                kernels[f"{path.stem}.{node.name}"] = node
    return kernels


def _pdl_launched(tree_path: Path) -> set[str]:
    # kernel[grid](..., **pdl_launch(t)) -> the kernel's name
    names = set()
    for node in ast.walk(ast.parse(tree_path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            spread = [k.value for k in node.keywords if k.arg is None]
            if any(
                isinstance(v, ast.Call) and getattr(v.func, "id", "") == "pdl_launch"
                for v in spread
            ):
                names.add(f"{tree_path.stem}.{ast.unparse(node.func.value)}")
    return names


def test_kernels_launched_early_wait_before_anything_else() -> None:
    # A kernel launched with programmatic dependent launch may run while the previous
    # kernel still writes its inputs (or reads what it is about to overwrite): its
    # first statement must be the wait. A kernel that forgets it races.
    kernels = _jit_kernels()
    launched = set().union(
        *(_pdl_launched(p) for p in Path(kernels_pkg.__file__).parent.glob("*.py"))
    )
    assert {"skinny_gemm._skinny_gemm_kernel", "attention._paged_attention_kernel"} <= launched
    for name in launched:
        body = [
            s
            for s in kernels[name].body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        ]
        assert ast.unparse(body[0]) == "wait_for_prior_kernel(PDL)", name
