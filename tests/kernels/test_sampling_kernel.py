"""Fused sampling: the Triton kernel (interpreted) against its reference, and the draws
against the distribution they claim."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.sampling import (
    BLOCK_V,
    gumbel_noise_ref,
    row_keys,
    sample_tokens,
    sample_tokens_ref,
    sample_tokens_triton,
)


def run(fn, logits: torch.Tensor, inv_t: list[float], seed: int = 1) -> list[int]:
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    fn(logits, torch.tensor(inv_t, dtype=torch.float32), seed, out)
    return out.tolist()


def assert_same_draw(
    logits: torch.Tensor, inv_t: list[float], kernel: list[int], ref: list[int], seed: int
) -> None:
    """Equal tokens, or a near-tie of the reference's scores: the kernel's log may round
    differently from torch's in the last bit."""
    x = logits.float()
    noise = gumbel_noise_ref(row_keys(seed, x.shape[0]), x.shape[1])
    for row, (k, r) in enumerate(zip(kernel, ref, strict=True)):
        if k == r:
            continue
        t = inv_t[row]
        scores = x[row] if t == 0 else x[row] * t + noise[row]
        assert 0 <= k < x.shape[1] and float(scores[r] - scores[k]) < 1e-5, (row, k, r)


@pytest.mark.parametrize(
    ("dtype", "rows", "vocab"),
    [
        (torch.float32, 5, 3 * BLOCK_V + 17),  # several programs per row, a ragged tail
        (torch.bfloat16, 3, 5000),
        (torch.float16, 9, 700),  # one step of one program
    ],
)
def test_kernel_matches_the_reference(dtype: torch.dtype, rows: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    inv_t = [0.0 if r % 3 == 0 else 0.5 + r / 4 for r in range(rows)]  # greedy rows mixed in
    for seed in (1, 2**31 - 1):
        kernel = run(sample_tokens_triton, logits, inv_t, seed)
        ref = run(sample_tokens_ref, logits, inv_t, seed)
        assert_same_draw(logits, inv_t, kernel, ref, seed)
        greedy = logits.float().argmax(dim=-1).tolist()
        assert all(kernel[r] == greedy[r] for r in range(rows) if inv_t[r] == 0)


def test_strided_rows() -> None:
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(3))[:, 100:2600]
    inv_t = [1.0, 0.0, 2.0, 1.0]
    assert run(sample_tokens_triton, logits, inv_t) == run(sample_tokens_ref, logits, inv_t)


def test_greedy_ties_take_the_first_index_across_programs() -> None:
    vocab = 2 * BLOCK_V + 5
    logits = torch.zeros(3, vocab)
    logits[0, [7, BLOCK_V + 1, 2 * BLOCK_V + 2]] = 4.0  # tied across programs
    logits[1, [2 * BLOCK_V + 3, 2 * BLOCK_V + 4]] = 1.0  # only in the last one
    logits[2] = float("-inf")  # nothing finite: still a token of the vocabulary
    assert run(sample_tokens_triton, logits, [0.0] * 3) == [7, 2 * BLOCK_V + 3, 0]
    assert run(sample_tokens_ref, logits, [0.0] * 3)[:2] == [7, 2 * BLOCK_V + 3]


def test_nan_rows_still_give_a_token() -> None:
    logits = torch.full((2, 300), float("nan"))
    for token in run(sample_tokens_triton, logits, [0.0, 1.0]):
        assert 0 <= token < 300


def chi_square(tokens: list[int], probs: list[float]) -> float:
    n = len(tokens)
    return sum((tokens.count(t) - n * p) ** 2 / (n * p) for t, p in enumerate(probs))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_reference_draws_follow_the_tempered_distribution(temperature: float) -> None:
    probs = [0.05, 0.1, 0.15, 0.3, 0.4]
    rows = 40_000  # every row has its own key: 40,000 independent draws
    logits = torch.tensor(probs).log().expand(rows, -1)
    tokens = run(sample_tokens_ref, logits, [1 / temperature] * rows, seed=11)
    tempered = [p ** (1 / temperature) for p in probs]
    expected = [p / sum(tempered) for p in tempered]
    # 4 degrees of freedom: P(chi2 > 30) is about 5e-6; a wrong sign or scale is far out
    assert chi_square(tokens, expected) < 30


def test_kernel_draws_follow_the_distribution() -> None:
    probs = [0.1, 0.2, 0.3, 0.4]
    rows = 400  # interpreted programs are slow; gross errors still show
    logits = torch.tensor(probs).log().expand(rows, -1).contiguous()
    tokens = run(sample_tokens_triton, logits, [1.0] * rows, seed=5)
    assert chi_square(tokens, probs) < 28  # 3 degrees of freedom, P about 4e-6


def test_steps_draw_anew_and_a_seed_repeats() -> None:
    logits = torch.zeros(8, 1000)
    first, again = (run(sample_tokens_ref, logits, [1.0] * 8, seed=3) for _ in range(2))
    other = run(sample_tokens_ref, logits, [1.0] * 8, seed=4)
    assert first == again and first != other
    assert len(set(first)) > 4  # rows of one step draw independently


def test_noise_is_uniform_in_log_space() -> None:
    noise = gumbel_noise_ref(row_keys(9, 4), 50_000).flatten()  # Gumbel(0, 1)
    assert math.isclose(float(noise.mean()), 0.5772, abs_tol=0.01)  # Euler-Mascheroni
    assert math.isclose(float(noise.var()), math.pi**2 / 6, rel_tol=0.02)
    assert noise.isfinite().all()


def test_bad_arguments_are_refused() -> None:
    logits = torch.zeros(2, 10)
    out = torch.empty(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="inv_temperature"):
        sample_tokens_triton(logits, torch.ones(3), 1, out)
    with pytest.raises(ValueError, match="out"):
        sample_tokens_triton(logits, torch.ones(2), 1, out.int())
    with pytest.raises(ValueError, match="logits"):
        sample_tokens_triton(torch.zeros(2, 10, dtype=torch.int32), torch.ones(2), 1, out)


def test_dispatch_runs_the_reference_on_the_cpu(monkeypatch) -> None:
    monkeypatch.setenv("TESSERA_KERNELS", "auto")
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(4))
    assert run(sample_tokens, logits, [0.0, 1.0, 1.0]) == run(
        sample_tokens_ref, logits, [0.0, 1.0, 1.0]
    )


def test_the_most_programs_a_row_can_have(monkeypatch) -> None:
    """MAX_SPLITS programs per row, merged in one block of that size."""
    import kernels.sampling as sampling

    assert sampling.choose_splits(1, 1 << 20, sms=132) == sampling.MAX_SPLITS
    assert sampling.choose_splits(256, 151936, sms=132) == 3
    monkeypatch.setattr(sampling, "choose_splits", lambda *_: sampling.MAX_SPLITS)
    vocab = sampling.MAX_SPLITS * BLOCK_V
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(6))
    logits[0, vocab - 3] = 50.0  # the greedy row's answer sits in the last program
    inv_t = [0.0, 1.0]
    kernel = run(sample_tokens_triton, logits, inv_t, seed=8)
    assert kernel[0] == vocab - 3
    assert_same_draw(logits, inv_t, kernel, run(sample_tokens_ref, logits, inv_t, seed=8), 8)
