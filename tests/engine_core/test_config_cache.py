"""The on-disk cache of model configs: converted once per file version."""

from __future__ import annotations

import json
import os

import pytest

from engine_core import config_cache


def test_converted_once_then_read_back_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    calls = []

    def convert(path):
        calls.append(path)
        return {"model_type": "llama", "n": len(calls), "rope": [1, 2]}

    monkeypatch.setattr(config_cache, "_convert_gguf", convert)
    first = config_cache.gguf_hf_config(model)
    assert (
        config_cache.gguf_hf_config(str(model))
        == first
        == {
            "model_type": "llama",
            "n": 1,
            "rope": [1, 2],
        }
    )
    assert len(calls) == 1
    os.utime(model, ns=(1, 1))  # another version of the file
    assert config_cache.gguf_hf_config(model)["n"] == 2


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(blocker / "cache"))  # under a file
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(config_cache, "_convert_gguf", lambda path: {"ok": True})
    assert config_cache.gguf_hf_config(model) == {"ok": True}


def test_folder_configs_are_transformers_reading_cached(tmp_path, monkeypatch):
    # A model folder's config.json and generation_config.json: what transformers makes
    # of them (its defaults filled in), read back from the cache while the files stay.
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    from transformers import AutoConfig, GenerationConfig, LlamaConfig

    folder = tmp_path / "model"
    LlamaConfig(hidden_size=64, num_hidden_layers=2).save_pretrained(folder)
    GenerationConfig(eos_token_id=3, temperature=0.7, do_sample=True).save_pretrained(folder)
    want = json.loads(json.dumps(AutoConfig.from_pretrained(folder).to_dict(), default=str))
    assert config_cache.folder_hf_config(folder) == want
    gen = config_cache.generation_config(folder)
    assert gen["eos_token_id"] == 3 and gen["temperature"] == 0.7
    monkeypatch.setattr(config_cache, "_convert_folder", lambda path: pytest.fail("converted"))
    assert config_cache.folder_hf_config(folder) == want  # from the cache
    (folder / "config.json").write_text(json.dumps({**want, "hidden_size": 128}))
    monkeypatch.undo()
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    assert config_cache.folder_hf_config(folder)["hidden_size"] == 128  # converted again
