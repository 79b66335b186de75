"""Model configs converted by transformers once per file version, kept on disk.

Reading a model's config through transformers costs seconds in every process that
starts the model (server, tests): importing transformers pulls in torch and much of
torch.distributed (~5 s on a slow CPU for a Llama folder), and a GGUF file's config
parses all of its metadata, the whole tokenizer vocabulary included (~12 s for
SmolLM2-135M). The results are small JSON dicts, so they are cached under
`$TESSERA_CACHE_DIR` (default `$XDG_CACHE_HOME/tessera`, else `~/.cache/tessera`),
keyed by the source file's absolute path, size and modification time and by the
transformers version that converted it: a changed file or another transformers
converts again. A cache that cannot be read or written is only a slower start, never
an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    if os.environ.get("TESSERA_CACHE_DIR"):
        return Path(os.environ["TESSERA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tessera"


def gguf_hf_config(path: str | Path) -> dict[str, Any]:
    """transformers' config dict of the GGUF file at `path`."""
    return cached_json("gguf-config", Path(path), _convert_gguf)


def folder_hf_config(folder: str | Path) -> dict[str, Any]:
    """transformers' config dict (AutoConfig) of the model folder `folder`."""
    return cached_json("hf-config", Path(folder) / "config.json", _convert_folder)


def generation_config(folder: str | Path) -> dict[str, Any]:
    """The generation_config.json of `folder` as transformers reads it: the values
    that differ from GenerationConfig's defaults."""
    return cached_json("generation-config", Path(folder) / "generation_config.json", _convert_gen)


def cached_json(kind: str, source: Path, convert: Callable[[Path], dict[str, Any]]) -> Any:
    """convert(source), from the cache while `source` is unchanged."""
    entry = _entry(kind, source)
    try:
        return json.loads(entry.read_text())
    except (OSError, ValueError):
        pass
    # stored as JSON and read back from that text, so the first start gets the same
    # JSON-normalized dict (str keys, lists for tuples) as every later one
    text = json.dumps(convert(source), default=str)
    _store(entry, text)
    return json.loads(text)


def _entry(kind: str, path: Path) -> Path:
    # the version from the package metadata: importing transformers takes seconds
    version = importlib.metadata.version("transformers")
    path = path.resolve()
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{version}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir() / kind / f"{digest}.json"


def _convert_gguf(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    return config.to_dict()


def _convert_folder(config_json: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(config_json.parent), local_files_only=True).to_dict()


def _convert_gen(gen_json: Path) -> dict[str, Any]:
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(str(gen_json.parent), local_files_only=True)
    values = config.to_diff_dict()
    values.pop("transformers_version", None)
    return values


def _store(entry: Path, text: str) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: a concurrent reader never sees half a file
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, entry)
    except OSError as error:
        logger.warning("model config not cached (%s): the next start converts it again", error)
