"""The Hugging Face config of a GGUF file, converted once and kept on disk.

transformers builds the config of a GGUF file by parsing all of its metadata, the
whole tokenizer vocabulary included: about 12 s for SmolLM2-135M on a slow CPU, paid
again by every process that starts the model (server, engine core, tests). The
result is a small JSON dict, so it is cached under `$TESSERA_CACHE_DIR` (default
`$XDG_CACHE_HOME/tessera`, else `~/.cache/tessera`), keyed by the file's absolute
path, size and modification time and by the transformers version that converted it:
a changed file or another transformers converts again. A cache that cannot be read
or written is only a slower start, never an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    if os.environ.get("TESSERA_CACHE_DIR"):
        return Path(os.environ["TESSERA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tessera"


def gguf_hf_config(path: str | Path) -> dict[str, Any]:
    """transformers' config dict of the GGUF file at `path` (from the cache when fresh)."""
    entry = _entry(Path(path))
    try:
        return json.loads(entry.read_text())
    except (OSError, ValueError):
        pass
    # stored as JSON and read back from that text, so the first start gets the same
    # JSON-normalized dict (str keys, lists for tuples) as every later one
    text = json.dumps(_convert(Path(path)), default=str)
    _store(entry, text)
    return json.loads(text)


def _entry(path: Path) -> Path:
    # the version from the package metadata: importing transformers takes seconds
    version = importlib.metadata.version("transformers")
    path = path.resolve()
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{version}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir() / "gguf-config" / f"{digest}.json"


def _convert(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    return config.to_dict()


def _store(entry: Path, text: str) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: a concurrent reader never sees half a file
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, entry)
    except OSError as error:
        logger.warning("GGUF config not cached (%s): the next start converts it again", error)
