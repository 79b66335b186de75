"""Weight loading: safetensors, pt, GGUF, dummy. (SmolLM2's GGUF against transformers' own
GGUF reading is in test_smollm2.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from executor.config import EngineConfig, LoadConfig
from executor.forward_context import ForwardContext, forward_context
from executor.loader import checkpoint_weights, load_model
from executor.loader.gguf import hf_name, iter_gguf, unpermute_qk
from executor.models.registry import CausalLM
from tests.helpers.tiny_models import make_engine_config, make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


# ----------------------------------------------------------------------------------------
# safetensors and pt


def test_loaded_params_are_the_checkpoint_tensors(llama_dir: Path) -> None:
    params = _params(load_model(make_engine_config(llama_dir), CPU))
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    qkv = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(params["model.layers.1.self_attn.qkv_proj.weight"], qkv)
    gate_up = torch.cat([ckpt[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(params["model.layers.1.mlp.gate_up_proj.weight"], gate_up)
    assert torch.equal(params["lm_head.weight"], ckpt["lm_head.weight"])


def test_pt_bin_loads_like_safetensors(llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy_config(llama_dir, tmp_path / "pt")
    torch.save(load_file(str(llama_dir / "model.safetensors")), folder / "pytorch_model.bin")
    torch.save({"step": torch.tensor(3)}, folder / "training_args.bin")  # not weights
    want = load_model(make_engine_config(llama_dir), CPU)
    for fmt in ("auto", "pt"):
        assert_same_params(load_model(make_engine_config(folder, load_format=fmt), CPU), want)


def test_sharded_safetensors_follow_the_index(llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy_config(llama_dir, tmp_path / "sharded")
    tensors = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # a stray copy the index does not name must not load (it would be a duplicate)
    save_file({"extra.weight": torch.zeros(1)}, str(folder / "consolidated.safetensors"))
    got = load_model(make_engine_config(folder), CPU)
    assert_same_params(got, load_model(make_engine_config(llama_dir), CPU))


def test_unprefixed_opt_and_gpt2_checkpoints(tmp_path: Path) -> None:
    # facebook/opt-* and the original gpt2 were saved from the base model: no
    # "model." / "transformer." prefix, and gpt2 carries causal-mask buffers.
    for arch, prefix in (("opt", "model."), ("gpt2", "transformer.")):
        folder = make_tiny_model(tmp_path / arch, arch)
        ckpt = load_file(str(folder / "model.safetensors"))
        bare = {n.removeprefix(prefix): t for n, t in ckpt.items()}
        if arch == "gpt2":
            bare["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
        want = load_model(make_engine_config(folder), CPU)
        got = load_model(make_engine_config(folder, load_format="dummy"), CPU)
        got.load_weights(bare.items())
        assert_same_params(got, want)


def test_unknown_and_missing_tensors_are_errors(llama_dir: Path) -> None:
    model = load_model(make_engine_config(llama_dir, load_format="dummy"), CPU)
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        model.load_weights([*ckpt.items(), ("model.layers.0.mystery.weight", torch.zeros(1))])
    del ckpt["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        model.load_weights(ckpt.items())
    # one shard of a fused projection missing: the fused parameter is incomplete
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    del ckpt["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.self_attn.qkv_proj.weight"):
        model.load_weights(ckpt.items())
    # rotary buffers of old checkpoints are dropped, not errors
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    ckpt["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    model.load_weights(ckpt.items())


def test_missing_weights_name_the_path(tmp_path: Path, llama_dir: Path) -> None:
    empty = _copy_config(llama_dir, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=str(empty)):
        load_model(make_engine_config(empty), CPU)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(make_engine_config(empty, load_format="safetensors"), CPU)
    gone = tmp_path / "gone.gguf"
    config = make_engine_config(gone, hf_config=json.loads((llama_dir / "config.json").read_text()))
    with pytest.raises(FileNotFoundError, match=str(gone)):
        load_model(config, CPU)
    with pytest.raises(ValueError, match="load format 'tensorizer'"):
        load_model(make_engine_config(llama_dir, load_format="tensorizer"), CPU)


def test_progress_bar_only_when_asked(llama_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = make_engine_config(llama_dir)
    list(checkpoint_weights(config))
    assert "Loading" not in capfd.readouterr().err
    loud = EngineConfig(model=config.model, load=LoadConfig(use_tqdm_on_load=True))
    list(checkpoint_weights(loud))
    assert "Loading safetensors" in capfd.readouterr().err


def test_bfloat16_params_keep_a_float32_rotary_cache(llama_dir: Path) -> None:
    model = load_model(make_engine_config(llama_dir, dtype="bfloat16"), CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rope = model.model.layers[0].self_attn.rotary_emb  # type: ignore[union-attr,index]
    assert rope.cos_sin_cache.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# dummy


def _dummy(folder: Path, seed: int, dtype: str = "float32") -> CausalLM:
    config = make_engine_config(folder, load_format="dummy", seed=seed, dtype=dtype)
    return load_model(config, CPU)


def test_dummy_weights_are_reproducible_and_small(llama_dir: Path) -> None:
    a, b, c = _dummy(llama_dir, 1), _dummy(llama_dir, 1), _dummy(llama_dir, 2)
    assert_same_params(a, b)
    embed = "model.embed_tokens.weight"
    assert not torch.equal(_params(a)[embed], _params(c)[embed])
    for name, p in a.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert float(p.std()) == pytest.approx(0.02, rel=0.2), name


def test_dummy_bfloat16_forward_stays_finite(llama_dir: Path) -> None:
    model = _dummy(llama_dir, 0, "bfloat16")
    ids = torch.arange(1, 200)
    with torch.no_grad(), forward_context(ForwardContext(attn=None, kv_caches=[])):
        logits = model.compute_logits(model(ids, ids - 1))  # [T, V]
    assert logits.dtype == torch.bfloat16  # the samplers widen it themselves
    assert bool(torch.isfinite(logits).all())


# ----------------------------------------------------------------------------------------
# GGUF


def test_gguf_names_map_to_hf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert hf_name("blk.1.ffn_gate.weight") == "model.layers.1.mlp.gate_proj.weight"
    assert hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hf_name("blk.1.attn_norm.weight") == "model.layers.1.input_layernorm.weight"
    assert hf_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        hf_name("blk.0.ffn_gate_exps.weight")


def llama_cpp_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp's converter: each head's rows go from [half, pair] to [pair, half] order.
    rows = w.shape[0]
    return (
        w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("num_heads", [1, 3, 4])
def test_unpermute_qk_inverts_llama_cpp(num_heads: int) -> None:
    w = torch.randn(num_heads * 8, 5)
    permuted = llama_cpp_permute(w, num_heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, num_heads), w)
    b = torch.randn(num_heads * 8)
    assert torch.equal(unpermute_qk(llama_cpp_permute(b, num_heads), num_heads), b)


def _hf_to_gguf_name(name: str) -> str:
    table = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{idx}.{table[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[name]


def write_llama_gguf(folder: Path, path: Path) -> None:
    """A float32 GGUF of a tiny HF llama folder, q/k permuted as llama.cpp writes them."""
    cfg = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    for name, t in sorted(load_file(str(folder / "model.safetensors")).items()):
        if ".q_proj." in name:
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        writer.add_tensor(_hf_to_gguf_name(name), t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_float32_gguf_loads_the_checkpoint_exactly(llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(llama_dir, path)
    want = load_file(str(llama_dir / "model.safetensors"))
    got = dict(iter_gguf(path, use_tqdm=False))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    hf_config = json.loads((llama_dir / "config.json").read_text())
    # load_format auto picks the GGUF; gguf_file may name a file inside model_path
    for config in (
        make_engine_config(path, hf_config=hf_config),
        make_engine_config(tmp_path, hf_config=hf_config, gguf_file="tiny.gguf"),
    ):
        assert_same_params(load_model(config, CPU), load_model(make_engine_config(llama_dir), CPU))
