"""Zero-padded attention heads for tensor parallelism: the layout, the zero weight rows,
and that the padded ranks together compute exactly the unpadded layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from executor.forward_context import ForwardContext, forward_context
from executor.layers import (
    Attention,
    HeadRowParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    TPGroup,
    get_tp_group,
    head_layout,
    set_tp_group,
)
from executor.loader.dummy import init_dummy_weights
from executor.models.llama import LlamaForCausalLM
from executor.models.registry import kv_cache_shape_info
from tests.helpers.tiny_models import tiny_hf_config

N = None  # a zero head, in the expected source lists below


def sources(h: int, hk: int, tp: int) -> list[tuple[list[int | None], list[int | None]]]:
    layout = head_layout(h, hk, tp)
    return [(layout.q_sources(r), layout.kv_sources(r)) for r in range(tp)]


def test_smollm2_heads_at_tp2_and_tp4() -> None:
    # 9 query heads, 3 kv heads: the kv heads pad to 4, each bringing 3 zero q heads
    assert sources(9, 3, 2) == [([0, 1, 2, 3, 4, 5], [0, 1]), ([6, 7, 8, N, N, N], [2, N])]
    assert sources(9, 3, 4) == [
        ([0, 1, 2], [0]),
        ([3, 4, 5], [1]),
        ([6, 7, 8], [2]),
        ([N, N, N], [N]),
    ]
    layout = head_layout(9, 3, 4)
    assert (layout.padded_heads, layout.kv_slots, layout.local_heads, layout.local_kv_heads) == (
        12,
        4,
        3,
        1,
    )


def test_replicated_kv_heads_pad_each_query_group() -> None:
    # 6 q / 2 kv at tp=4: kv head 0 on ranks 0-1, kv head 1 on ranks 2-3; each group of
    # 3 query heads pads to 4, so no query head lands beside another group's kv head.
    assert sources(6, 2, 4) == [([0, 1], [0]), ([2, N], [0]), ([3, 4], [1]), ([5, N], [1])]
    # 6 q / 3 kv at tp=4: 3 kv heads pad to 4 (the smallest divisor of 4 not below 3)
    assert sources(6, 3, 4) == [([0, 1], [0]), ([2, 3], [1]), ([4, 5], [2]), ([N, N], [N])]
    assert sources(6, 3, 2) == [([0, 1, 2, 3], [0, 1]), ([4, 5, N, N], [2, N])]


@pytest.mark.parametrize(("h", "hk", "tp"), [(4, 2, 2), (4, 2, 4), (8, 8, 4), (32, 8, 8)])
def test_no_padding_when_the_heads_divide(h: int, hk: int, tp: int) -> None:
    layout = head_layout(h, hk, tp)
    assert not layout.padded
    per_rank = h // tp
    assert [q for q, _ in sources(h, hk, tp)] == [
        list(range(r * per_rank, (r + 1) * per_rank)) for r in range(tp)
    ]


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize(("h", "hk"), [(9, 3), (6, 3), (6, 2), (7, 7), (12, 4), (5, 1), (14, 2)])
def test_every_layout_is_exact(h: int, hk: int, tp: int) -> None:
    layout = head_layout(h, hk, tp)
    group = h // hk
    seen: list[int] = []
    for q, kv in sources(h, hk, tp):
        assert len(q) == layout.local_heads and len(kv) == layout.local_kv_heads
        local_group = layout.local_heads // layout.local_kv_heads
        for i, source in enumerate(q):
            if source is not None:  # a real q head sits beside its own kv head
                assert kv[i // local_group] == source // group
                seen.append(source)
    assert sorted(seen) == list(range(h))  # every real q head exactly once
    assert layout.padded == (layout.padded_heads != h)


def test_heads_that_do_not_group_are_refused() -> None:
    with pytest.raises(ValueError, match="6 query heads do not group over 4 kv heads"):
        head_layout(6, 4, 2)


def test_kv_cache_shape_counts_the_padded_kv_heads() -> None:
    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}
    cfg["hidden_size"] = 576
    assert kv_cache_shape_info(cfg, 1) == (30, 3, 64)
    assert kv_cache_shape_info(cfg, 2) == (30, 2, 64)
    assert kv_cache_shape_info(cfg, 4) == (30, 1, 64)


# ----------------------------------------------------------------------------------------
# Weights


HIDDEN, D = 12, 4


def _checkpoint(h: int, hk: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "q": rand(h * D, HIDDEN),
        "k": rand(hk * D, HIDDEN),
        "v": rand(hk * D, HIDDEN),
        "q_bias": rand(h * D),
        "k_bias": rand(hk * D),
        "v_bias": rand(hk * D),
        "o": rand(HIDDEN, h * D),
        "o_bias": rand(HIDDEN),
    }


def _rank_layers(
    h: int, hk: int, tp: TPGroup, ckpt: dict[str, torch.Tensor]
) -> tuple[QKVParallelLinear, HeadRowParallelLinear]:
    qkv = QKVParallelLinear(HIDDEN, D, h, hk, True, torch.float32, tp)
    o = HeadRowParallelLinear(qkv.layout, D, HIDDEN, True, torch.float32, tp)
    for sid in "qkv":
        qkv.weight_loader(qkv.weight, ckpt[sid], sid)
        assert qkv.bias is not None
        qkv.bias.weight_loader(qkv.bias, ckpt[f"{sid}_bias"], sid)  # type: ignore[attr-defined]
    o.weight_loader(o.weight, ckpt["o"])
    assert o.bias is not None
    o.weight_loader(o.bias, ckpt["o_bias"])
    return qkv, o


def _heads(t: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
    return list(t.split(D, dim=dim))


def test_zero_heads_get_zero_rows_and_columns() -> None:
    ckpt = _checkpoint(9, 3)
    qkv, o = _rank_layers(9, 3, TPGroup(rank=1, size=2), ckpt)  # q 6-8 + 3 zero, kv 2 + zero
    assert (qkv.num_heads, qkv.num_kv_heads) == (6, 2)
    q_rows, k_rows, v_rows = qkv.weight.split([6 * D, 2 * D, 2 * D])
    q_bias, k_bias, _ = qkv.bias.split([6 * D, 2 * D, 2 * D])  # type: ignore[union-attr]
    want_q = _heads(ckpt["q"])[6:9]
    for i, rows in enumerate(_heads(q_rows)):
        assert torch.equal(rows, want_q[i] if i < 3 else torch.zeros(D, HIDDEN))
    assert torch.equal(_heads(q_bias)[2], _heads(ckpt["q_bias"])[8])
    assert not _heads(q_bias)[3].any()
    assert torch.equal(_heads(k_rows)[0], _heads(ckpt["k"])[2])
    assert not _heads(k_rows)[1].any() and not _heads(v_rows)[1].any()
    assert not _heads(k_bias)[1].any()
    o_cols = _heads(o.weight, dim=1)
    assert torch.equal(o_cols[0], _heads(ckpt["o"], dim=1)[6])
    assert all(not c.any() for c in o_cols[3:])
    assert torch.equal(o.bias, ckpt["o_bias"])  # type: ignore[arg-type]


def test_zero_heads_stay_zero_under_qk_norm() -> None:
    norm = RMSNorm(D, 1e-6, torch.float32)
    norm.weight.data.fill_(3.0)
    assert not norm(torch.zeros(2, D)).any()  # type: ignore[union-attr]


def _attention_out(
    h: int, hk: int, tp: TPGroup, ckpt: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    # this rank's partial output projection (the sum over ranks is the all-reduce)
    qkv, o = _rank_layers(h, hk, tp, ckpt)
    attn = Attention(qkv.num_heads, D, D**-0.5, qkv.num_kv_heads)
    q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
    with forward_context(ForwardContext(attn=None, kv_caches=[])):
        return F.linear(attn(q, k, v), o.weight)  # [T, hidden]


@pytest.mark.parametrize(("h", "hk"), [(9, 3), (6, 3), (6, 2)])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_padded_ranks_sum_to_the_unpadded_layer(h: int, hk: int, tp: int) -> None:
    ckpt = _checkpoint(h, hk, seed=h * 10 + tp)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))  # [T, hidden]
    want = _attention_out(h, hk, TPGroup(), ckpt, x)
    got = sum(_attention_out(h, hk, TPGroup(rank=r, size=tp), ckpt, x) for r in range(tp))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dummy_weights_keep_zero_heads_zero() -> None:
    cfg = tiny_hf_config(
        "llama", hidden_size=36, num_attention_heads=9, num_key_value_heads=3, vocab_size=64
    ).to_dict()
    before = get_tp_group()
    set_tp_group(TPGroup(rank=3, size=4))  # the rank of only zero heads
    try:
        model = LlamaForCausalLM(cfg, torch.float32)
    finally:
        set_tp_group(before)
    init_dummy_weights(model, seed=0)
    attn = model.model.layers[0].self_attn
    assert not attn.qkv_proj.weight.any() and not attn.o_proj.weight.any()
    assert model.model.layers[0].mlp.gate_up_proj.weight.any()
