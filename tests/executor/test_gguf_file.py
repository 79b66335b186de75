"""Our GGUF reader against the gguf package's on a file with every kind of value."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from executor.loader.gguf_file import GGUFFile


@pytest.fixture
def gguf_path(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.attention.head_count", 4)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.chat_template", "{{ messages }} é")
    w.add_token_list(["a", "bé", "<s>"] * 50)  # a string array: skipped
    w.add_array("some.ints", [1, 2, 3])
    w.add_int64("some.big", -(2**40))
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((6, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float16))
    q8 = gguf.quants.quantize(
        rng.standard_normal((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_same_tensors_and_scalars_as_the_gguf_package(gguf_path):
    ours, theirs = GGUFFile(gguf_path), gguf.GGUFReader(str(gguf_path))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data)
        np.testing.assert_array_equal(
            gguf.quants.dequantize(a.data, a.tensor_type),
            gguf.quants.dequantize(b.data, b.tensor_type),
        )
    scalars = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    arrays = {"tokenizer.ggml.tokens", "some.ints"}
    assert set(ours.fields) == set(scalars) - arrays
    for key, value in ours.fields.items():
        assert (
            value == pytest.approx(scalars[key])
            if isinstance(value, float)
            else value == scalars[key]
        )
    assert ours.fields["tokenizer.chat_template"].endswith("é")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(path)
