"""Model definitions and shared layers, checked token for token against transformers.

Each tiny architecture is loaded with our loader and decoded greedily over a real
paged KV cache (3 prompts prefilled in one step, then batched decodes); the tokens
must equal transformers' generate(do_sample=False) in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from executor.forward_context import ForwardContext, forward_context
from executor.layers.attention import Attention
from executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
)
from executor.layers.rotary import RotaryEmbedding, rope_frequencies
from executor.loader import load_model
from executor.models.registry import (
    SUPPORTED_ARCHITECTURES,
    architecture_of,
    get_model_class,
    kv_cache_shape_info,
)
from executor.rope_config import rope_settings
from kernels.dispatch import interpreting
from tests.helpers.tiny_models import (
    PagedRunner,
    attention_metadata,
    greedy_generate,
    hf_greedy_generate,
    make_engine_config,
    make_kv_caches,
    make_tiny_model,
    tiny_hf_config,
)

# (arch, config overrides): every architecture, plus the variants with their own code
# paths: post-norm OPT with project_in/out (opt-350m style) and Qwen2 with tied embeddings.
CASES = [
    ("llama", {}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("opt", {}),
    ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    ("gpt2", {}),
]
# GPT-2 token ids of three prompts of different lengths (14, 2 and 9 tokens).
PROMPTS = [
    [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40, 588, 11],
    [15496, 995],
    [1, 2, 3, 4, 5, 6, 7, 8, 9],
]
# Logit gap between the greedy token and the runner-up below which float rounding
# could decide a tie; the tiny models are scaled to stay far above it.
MIN_MARGIN = 1e-2


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    arch, overrides = case
    return "-".join([arch, *overrides])


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def tiny(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch, overrides = request.param
    return arch, make_tiny_model(tmp_path_factory.mktemp(arch), arch, **overrides)


def _load(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = make_engine_config(path)
    return load_model(config, torch.device("cpu")), config.model.hf_config


# ----------------------------------------------------------------------------------------
# Token for token against transformers


def test_greedy_tokens_equal_transformers(tiny: tuple[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    arch, path = tiny
    model, hf_config = _load(path)
    got = greedy_generate(model, hf_config, PROMPTS, max_new_tokens=16)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    want = hf_greedy_generate(hf_model, PROMPTS, max_new_tokens=16)
    assert got.tokens == want, arch
    assert got.min_margin > MIN_MARGIN, f"{arch}: a greedy choice was a near tie"


def test_mistral_sliding_window_changes_tokens(tmp_path: Path) -> None:
    # Same weights with and without the window: past 8 tokens the outputs must part,
    # or the window test above would prove nothing.
    path = make_tiny_model(tmp_path, "mistral")
    windowed, cfg = _load(path)
    full = load_model(make_engine_config(path, disable_sliding_window=True), torch.device("cpu"))
    prompt = [PROMPTS[0]]
    assert (
        greedy_generate(windowed, cfg, prompt, 8).tokens
        != greedy_generate(full, cfg, prompt, 8).tokens
    )


@pytest.mark.slow
@pytest.mark.skipif(not interpreting(), reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_triton_kernels_give_the_same_tokens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # With TESSERA_KERNELS=triton the public kernels run their Triton versions (here
    # interpreted): the layers' calls must pass the wrappers' shape and stride checks.
    # Qwen3 exercises the most kernels (per-head q/k norms included). Its vocabulary is
    # cut to 2048 + 17 tokens: the LM head's skinny GEMM still takes the 32-column tiles
    # of outputs past 2048 and ends in a 17-column part tile, as with GPT-2's 50257,
    # but in 65 interpreted programs instead of 1571 (which took most of a minute).
    vocab = 2048 + 17
    model, cfg = _load(make_tiny_model(tmp_path, "qwen3", vocab_size=vocab))
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    want = greedy_generate(model, cfg, prompts, max_new_tokens=2).tokens
    monkeypatch.setenv("TESSERA_KERNELS", "triton")
    assert greedy_generate(model, cfg, prompts, max_new_tokens=2).tokens == want


# ----------------------------------------------------------------------------------------
# Chunked prefill, mixed batches and the no-cache path


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_chunked_prefill_equals_one_pass(arch: str, tmp_path: Path) -> None:
    model, cfg = _load(make_tiny_model(tmp_path, arch))
    prompt = list(range(100, 120))
    one = PagedRunner(model, cfg)
    seq = one.add(prompt)
    want = one.step([(seq, 20)], all_logits=True)  # [20, V]

    two = PagedRunner(model, cfg)
    a, b = two.add(prompt), two.add([7, 8, 9, 10, 11])
    first = two.step([(a, 12)], all_logits=True)  # [12, V]
    # the second chunk shares its step with another sequence's prefill
    second = two.step([(a, 8), (b, 5)], all_logits=True)[:8]  # [8, V]
    # float32 rounding of another attention shape: the logits of these peaked models
    # reach ~80 (float32 spacing ~8e-6 there): 5e-4 absolute is a few dozen ulps
    torch.testing.assert_close(torch.cat([first, second]), want, atol=5e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_forward_without_cache_equals_paged(arch: str, tmp_path: Path) -> None:
    # The profiling run: no cache, the batch is one causal sequence.
    model, cfg = _load(make_tiny_model(tmp_path, arch))
    prompt = list(range(300, 318))  # longer than mistral's window of 8
    runner = PagedRunner(model, cfg)
    want = runner.step([(runner.add(prompt), len(prompt))], all_logits=True)
    with torch.no_grad(), forward_context(ForwardContext(attn=None, kv_caches=[])):
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)))
        got = model.compute_logits(hidden)  # type: ignore[operator]
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-5)  # see the chunked test


@pytest.mark.parametrize("query_block", [1024, 3])  # 3: the capped path goes in blocks
def test_attention_soft_cap_without_cache_equals_paged(
    query_block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("executor.layers.attention.CAPPED_QUERY_BLOCK", query_block)
    torch.manual_seed(0)
    t, h, hk, d = 7, 4, 2, 16
    layer = Attention(h, d, d**-0.5, hk, layer_idx=0, sliding_window=3, soft_cap=5.0)
    q, k, v = torch.randn(t, h * d) * 3, torch.randn(t, hk * d) * 3, torch.randn(t, hk * d)
    with forward_context(ForwardContext(attn=None, kv_caches=[])):
        got = layer(q, k, v)
    shape = {"num_hidden_layers": 1, "num_attention_heads": h, "num_key_value_heads": hk}
    caches = make_kv_caches({**shape, "hidden_size": h * d}, 4, 4, torch.float32)
    meta = attention_metadata(list(range(4, 4 + t)), [0, t], [t], [[1, 2]])  # blocks 1, 2
    with forward_context(ForwardContext(attn=meta, kv_caches=caches)):
        want = layer(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Registry


def test_unknown_architecture_lists_supported_ones() -> None:
    with pytest.raises(ValueError, match="BertForMaskedLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        get_model_class("BertForMaskedLM")


def test_every_supported_architecture_resolves() -> None:
    for arch in SUPPORTED_ARCHITECTURES:
        assert get_model_class(arch).__name__ == arch


def test_architecture_from_model_type_when_architectures_is_missing() -> None:
    assert architecture_of({"architectures": None, "model_type": "llama"}) == "LlamaForCausalLM"
    assert architecture_of({"architectures": ["Qwen3ForCausalLM"]}) == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="not supported"):
        architecture_of({"model_type": "bert"})


@pytest.mark.parametrize(
    ("arch", "want"),
    [("llama", (2, 2, 16)), ("qwen3", (2, 2, 32)), ("opt", (2, 4, 16)), ("gpt2", (2, 4, 16))],
)
def test_kv_cache_shape_info(arch: str, want: tuple[int, int, int]) -> None:
    cfg = tiny_hf_config(arch).to_dict()
    assert kv_cache_shape_info(cfg) == want
    kv_heads = want[1]
    # kv heads split over ranks, one replicated head each past their count
    assert kv_cache_shape_info(cfg, tp_size=2)[1] == max(1, kv_heads // 2)
    assert kv_cache_shape_info(cfg, tp_size=8)[1] == 1


# ----------------------------------------------------------------------------------------
# Tensor-parallel sharding, simulated: every rank's shard, combined by hand, must give the
# unsharded layer's output. (The collectives themselves belong to executor/distributed.py.)


def _ranks(size: int) -> list[TPGroup]:
    return [TPGroup(rank=r, size=size) for r in range(size)]


def test_column_and_row_parallel_shards_recombine() -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(3, 8)
    col = []
    for tp in _ranks(3):
        layer = ColumnParallelLinear(8, 12, bias=True, tp=tp)
        layer.weight.weight_loader(layer.weight, w)  # type: ignore[attr-defined]
        layer.bias.weight_loader(layer.bias, b)  # type: ignore[union-attr]
        col.append(layer(x))  # [3, 4]
    torch.testing.assert_close(torch.cat(col, dim=-1), F.linear(x, w, b))

    w2, b2, x2 = torch.randn(5, 12), torch.randn(5), torch.randn(3, 12)
    partial = []
    for tp in _ranks(3):
        row = RowParallelLinear(12, 5, bias=True, reduce_results=False, tp=tp)
        row.weight.weight_loader(row.weight, w2)  # type: ignore[attr-defined]
        row.bias.weight_loader(row.bias, b2)  # type: ignore[union-attr]
        partial.append(row(x2[:, tp.rank * 4 : (tp.rank + 1) * 4]))
    torch.testing.assert_close(sum(partial), F.linear(x2, w2, b2))


def test_merged_column_parallel_shards() -> None:
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    for tp in _ranks(2):
        layer = MergedColumnParallelLinear(4, [6, 6], bias=False, tp=tp)
        layer.weight.weight_loader(layer.weight, gate, 0)  # type: ignore[attr-defined]
        layer.weight.weight_loader(layer.weight, up, 1)  # type: ignore[attr-defined]
        rows = slice(tp.rank * 3, (tp.rank + 1) * 3)
        assert torch.equal(layer.weight, torch.cat([gate[rows], up[rows]]))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size"), [(8, 8, 2), (8, 2, 2), (8, 2, 4), (4, 1, 4)]
)
def test_qkv_parallel_shards_replicate_kv_heads(heads: int, kv_heads: int, size: int) -> None:
    d = 2
    q, k, v = torch.randn(heads * d, 5), torch.randn(kv_heads * d, 5), torch.randn(kv_heads * d, 5)
    for tp in _ranks(size):
        layer = QKVParallelLinear(5, d, heads, kv_heads, bias=False, tp=tp)
        for sid, t in zip("qkv", (q, k, v), strict=True):
            layer.weight.weight_loader(layer.weight, t, sid)  # type: ignore[attr-defined]
        hq = heads // size
        kv_index = tp.rank * kv_heads // size  # the kv head serving this rank's q heads
        hk = max(1, kv_heads // size)
        want_q = q[tp.rank * hq * d : (tp.rank + 1) * hq * d]
        want_k = k[kv_index * d : (kv_index + hk) * d]
        want_v = v[kv_index * d : (kv_index + hk) * d]
        assert torch.equal(layer.weight, torch.cat([want_q, want_k, want_v]))
        # the merged (GPT-2 style) checkpoint tensor loads to the same shard
        merged = QKVParallelLinear(5, d, heads, kv_heads, bias=False, tp=tp)
        merged.weight.weight_loader(merged.weight, torch.cat([q, k, v]))  # type: ignore[attr-defined]
        assert torch.equal(merged.weight, layer.weight)


def test_vocab_parallel_embedding_and_lm_head_shards() -> None:
    vocab, dim = 10, 4  # 10 rows over 3 ranks: 4, 4, 2 + 2 rows of padding
    table, ids, hidden = torch.randn(vocab, dim), torch.tensor([0, 3, 4, 9]), torch.randn(2, dim)
    embedded = torch.zeros(4, dim)
    logits = []
    for tp in _ranks(3):
        emb = VocabParallelEmbedding(vocab, dim, tp=tp)
        emb.weight.weight_loader(emb.weight, table)  # type: ignore[attr-defined]
        mine = (ids >= emb.vocab_start) & (ids < emb.vocab_end)
        local = torch.where(mine, ids - emb.vocab_start, 0)
        embedded += F.embedding(local, emb.weight) * mine[:, None]
        head = ParallelLMHead(vocab, dim, tp=tp)
        head.tie_to(emb)
        logits.append(F.linear(hidden, head.weight))
    torch.testing.assert_close(embedded, table[ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :vocab], hidden @ table.T)


# ----------------------------------------------------------------------------------------
# Rotary scaling against transformers' definitions


def _hf_rope(rope: dict[str, Any], head_dim: int = 64, max_pos: int = 2048, **kw: Any) -> Any:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, torch.device("cpu"), **kw)


ROPE_CASES = [
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "truncate": False,
    },
]


@pytest.mark.parametrize("rope", ROPE_CASES, ids=lambda r: r["rope_type"])
def test_rope_frequencies_equal_transformers(rope: dict[str, Any]) -> None:
    want_inv_freq, want_factor = _hf_rope(rope)
    got = rope_frequencies(64, 10000.0, 2048, rope)
    torch.testing.assert_close(got.inv_freq, want_inv_freq, atol=0, rtol=1e-6)
    assert got.attention_factor == pytest.approx(want_factor)


def test_dynamic_ntk_frequencies_fixed_at_longest_context() -> None:
    rope = {"rope_type": "dynamic", "factor": 2.0}
    want, _ = _hf_rope(rope, seq_len=4096)  # HF rescales per length; ours at 2048 * 2
    got = rope_frequencies(64, 10000.0, 2048, rope)
    torch.testing.assert_close(got.inv_freq, want, atol=0, rtol=1e-6)
    assert got.cache_len == 4096


def test_rope_settings_reads_old_and_new_config_spellings() -> None:
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    new = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}
    assert rope_settings(old) == (5e5, {"type": "linear", "factor": 2.0}, 1.0)
    assert rope_settings(new) == (5e5, {"rope_type": "linear", "factor": 2.0}, 1.0)
    assert rope_settings({"partial_rotary_factor": 0.5}) == (10000.0, None, 0.5)


def test_partial_rotary_leaves_the_tail_dims_alone() -> None:
    rope = RotaryEmbedding(head_size=16, rotary_dim=8, max_position=32, base=10000.0)
    q, k = torch.randn(3, 2 * 16), torch.randn(3, 16)
    q0 = q.clone()
    rope(torch.tensor([0, 5, 9]), q, k)
    assert torch.equal(q.view(3, 2, 16)[..., 8:], q0.view(3, 2, 16)[..., 8:])
    assert torch.equal(q[0], q0[0])  # position 0 is the identity
    assert not torch.equal(q.view(3, 2, 16)[1:, :, :8], q0.view(3, 2, 16)[1:, :, :8])


def test_gptj_layout_is_neox_on_interleaved_dims() -> None:
    # Rotating interleaved pairs equals rotating halves after de-interleaving the dims.
    neox = RotaryEmbedding(8, 8, 16, 10000.0, is_neox=True)
    gptj = RotaryEmbedding(8, 8, 16, 10000.0, is_neox=False)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved -> halves
    pos = torch.tensor([3, 7])
    q, k = torch.randn(2, 8), torch.randn(2, 8)
    qn, kn = q[:, order].clone(), k[:, order].clone()
    gptj(pos, q, k)
    neox(pos, qn, kn)
    torch.testing.assert_close(q[:, order], qn)
    torch.testing.assert_close(k[:, order], kn)
