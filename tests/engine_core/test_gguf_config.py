"""The on-disk cache of GGUF configs: converted once per file version."""

from __future__ import annotations

import os

from engine_core import gguf_config


def test_converted_once_then_read_back_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    calls = []

    def convert(path):
        calls.append(path)
        return {"model_type": "llama", "n": len(calls), "rope": [1, 2]}

    monkeypatch.setattr(gguf_config, "_convert", convert)
    first = gguf_config.gguf_hf_config(model)
    assert (
        gguf_config.gguf_hf_config(str(model))
        == first
        == {
            "model_type": "llama",
            "n": 1,
            "rope": [1, 2],
        }
    )
    assert len(calls) == 1
    os.utime(model, ns=(1, 1))  # another version of the file
    assert gguf_config.gguf_hf_config(model)["n"] == 2


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(blocker / "cache"))  # under a file
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_config, "_convert", lambda path: {"ok": True})
    assert gguf_config.gguf_hf_config(model) == {"ok": True}
