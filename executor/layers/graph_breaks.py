"""Methods that stay outside torch.compile'd graphs (-O > 0): attention, collectives.

`torch.compiler.disable` used as a decorator imports torch._dynamo when the module is
imported: about 3 s of every engine process's start on a slow CPU, compiled or not.
So these methods are only marked at class creation (`eager_under_compile`), and
`apply()` wraps them in `torch.compiler.disable` when a model is first compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

_MARKED: list[tuple[type, str]] = []  # (class, method name)
_applied = False


class _Mark:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        _MARKED.append((owner, name))
        setattr(owner, name, self.fn)  # the plain function until apply()


def eager_under_compile(fn: F) -> F:
    """Mark a method to run eagerly, as a graph break, under torch.compile."""
    return cast(F, _Mark(fn))


def apply() -> None:
    """Wrap every marked method in torch.compiler.disable (once per process)."""
    global _applied
    if _applied:
        return
    import torch

    for owner, name in _MARKED:
        setattr(owner, name, torch.compiler.disable(vars(owner)[name]))
    _applied = True
