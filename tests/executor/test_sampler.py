"""The worker's sampler: exact masks, penalties, seeded draws and logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import executor.sampler as sampler_module
from executor.messages import Logprobs, SamplingOptions
from executor.sampler import (
    Sampler,
    SamplingBatch,
    apply_logits_processors,
    apply_min_p,
    apply_top_k_top_p,
    compute_prompt_logprobs,
    logprobs_to_wire,
    make_generator,
    pick_by_cdf,
    temperature_only,
)

NEG_INF = float("-inf")


# ---- factories -----------------------------------------------------------------------


def opts(**kwargs) -> SamplingOptions:
    return SamplingOptions(**kwargs)


def make_batch(
    options: list[SamplingOptions],
    vocab_size: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: dict[int, torch.Generator] | None = None,
) -> SamplingBatch:
    rows = len(options)
    return SamplingBatch.build(
        options,
        prompt_ids=prompts if prompts is not None else [[] for _ in range(rows)],
        output_ids=outputs if outputs is not None else [[] for _ in range(rows)],
        generators=generators or {},
        vocab_size=vocab_size,
        device="cpu",
    )


def logits_of_probs(*rows: list[float]) -> torch.Tensor:
    # softmax(log p) = p, so a test can state its distribution directly
    return torch.tensor(rows, dtype=torch.float64).log().float()  # [S, V]


def kept(logits: torch.Tensor) -> list[set[int]]:
    """Per row, the token ids that are still finite."""
    return [set(torch.nonzero(row.isfinite()).flatten().tolist()) for row in logits]


def top_k_top_p_survivors(logits: torch.Tensor, options: list[SamplingOptions]) -> list[set[int]]:
    batch = make_batch(options, logits.shape[1])
    filtered = logits.clone()
    apply_top_k_top_p(filtered, batch)
    return kept(filtered)


def sample(logits: torch.Tensor, options: list[SamplingOptions], **kwargs) -> list[int]:
    batch = make_batch(options, logits.shape[1], **kwargs)
    return Sampler()(logits, batch).token_ids.tolist()


# ---- batch flags -----------------------------------------------------------------------


def test_plain_batch_skips_every_optional_step():
    batch = make_batch([opts(), opts()], vocab_size=6)
    assert batch.all_random and not batch.all_greedy
    assert batch.no_top_k and batch.no_top_p and batch.no_min_p and batch.no_penalties
    assert batch.logit_bias is None and batch.allowed is None and batch.banned is None
    assert batch.greedy is None and batch.max_num_logprobs is None
    assert batch.any_unseeded_random and batch.seeded == []


def test_greedy_batch_builds_no_random_params():
    batch = make_batch([opts(temperature=0.0, top_k=3, top_p=0.5)], vocab_size=6)
    assert batch.all_greedy and batch.temperature is None
    assert batch.no_top_k and batch.no_top_p


def test_mixed_batch_neutralises_greedy_rows():
    batch = make_batch([opts(temperature=0.0, top_k=2), opts(temperature=0.5)], vocab_size=6)
    assert batch.greedy is not None and batch.greedy.tolist() == [True, False]
    assert batch.temperature is not None and batch.temperature.flatten().tolist() == [1.0, 0.5]
    assert batch.no_top_k  # the greedy row's top_k is irrelevant


# ---- greedy ------------------------------------------------------------------------------


def test_greedy_takes_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    assert sample(logits, [opts(temperature=0.0)] * 4) == logits.argmax(dim=-1).tolist()


def test_mixed_batch_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    options = [opts(temperature=0.0), opts(temperature=1.0), opts(temperature=0.0), opts()]
    tokens = sample(logits, options)
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]


def test_sampler_leaves_the_logits_untouched():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    options = [opts(logit_bias={1: 5.0}, repetition_penalty=1.5, top_k=3), opts(top_p=0.5)]
    sample(logits, options, outputs=[[1, 2], [3]], prompts=[[4], [5]])
    assert torch.equal(logits, before)


def test_greedy_rows_take_the_argmax_after_the_penalties_in_a_mixed_batch():
    # row 0 greedy: token 0 leads, but it is in the output and the penalty halves it
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    options = [opts(temperature=0.0, repetition_penalty=2.0), opts(temperature=1.0)]
    for _ in range(5):  # the random row makes the sampler scale its own copy in place
        assert sample(logits, options, outputs=[[0], []], prompts=[[3], [3]])[0] == 1


def test_cutoffs_found_in_row_chunks_equal_one_pass(monkeypatch):
    logits = torch.randn(10, 50, generator=torch.Generator().manual_seed(4))
    kinds = [opts(top_k=5), opts(top_p=0.5), opts(top_k=20, top_p=0.3), opts(), opts(min_p=0.1)]
    batch = make_batch(kinds * 2, vocab_size=50)
    whole = logits.clone()
    apply_top_k_top_p(whole, batch)
    monkeypatch.setattr(sampler_module, "CUTOFF_ROWS", 3)  # chunks of 3, 3, 3 and 1 rows
    chunked = logits.clone()
    apply_top_k_top_p(chunked, batch)
    assert torch.equal(chunked, whole)
    assert (whole == float("-inf")).any()


def test_the_widest_sampling_peaks_at_under_seven_logits_copies():
    """The profiled step's peak (executor/profiling.py) counts the widest sampling's
    temporaries, and the KV cache gets what is left: each [S, V] float32 temporary is
    0.6 GiB at 1024 rows of a 151,936-token vocabulary. Measured on the CPU (where a
    sum over a bool tensor adds an int64 copy that CUDA's reduction does not)."""
    from executor.profiling import run_widest_sampler

    logits = torch.randn(64, 4000, generator=torch.Generator().manual_seed(0))
    assert _peak_bytes(lambda: run_widest_sampler(logits, 5)) / logits.nbytes < 7.0  # was 8.5


def test_the_widest_sampling_peak_stops_growing_past_the_cutoff_chunk():
    """Past CUTOFF_ROWS rows (1024 on an H100) the sort and the top-p sums run in
    chunks: at four chunks the peak is under five logits-copies (6.5 in one pass)."""
    from executor.profiling import run_widest_sampler

    rows = 4 * sampler_module.CUTOFF_ROWS
    logits = torch.randn(rows, 600, generator=torch.Generator().manual_seed(0))
    assert _peak_bytes(lambda: run_widest_sampler(logits, 5)) / logits.nbytes < 5.0


def _peak_bytes(fn) -> int:
    """The most bytes the CPU allocator held at once during fn() (torch profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_logits_of_the_wrong_shape_are_refused():
    batch = make_batch([opts()], vocab_size=6)
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(1, 7), batch)


# ---- top-k, top-p, min-p -----------------------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0, 0.0]])
    assert top_k_top_p_survivors(logits, [opts(top_k=1)]) == [{1}]
    assert top_k_top_p_survivors(logits, [opts(top_k=3)]) == [{1, 2, 3}]


def test_top_k_keeps_every_token_tied_at_the_boundary():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 3.0, 0.0]])
    assert top_k_top_p_survivors(logits, [opts(top_k=1)]) == [{1, 3}]
    assert top_k_top_p_survivors(logits, [opts(top_k=3)]) == [{1, 2, 3, 4}]


def test_top_k_per_row_with_off_and_oversized_rows():
    row = [1.0, 5.0, 3.0, 4.0, 2.0, 0.0]
    logits = torch.tensor([row, row, row, row])
    options = [opts(top_k=2), opts(), opts(top_k=100), opts(top_k=4)]
    assert top_k_top_p_survivors(logits, options) == [
        {1, 3},
        set(range(6)),
        set(range(6)),
        {1, 2, 3, 4},
    ]


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.45, {1}),  # the first token alone crosses 0.45
        (0.7, {1, 3}),  # 0.5 < 0.7, so 0.3 is kept: it crosses p
        (0.85, {1, 3, 2}),
        (0.94, {1, 3, 2}),
        (0.96, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_token_that_crosses_p(top_p, expected):
    logits = logits_of_probs([0.05, 0.5, 0.15, 0.3])
    assert top_k_top_p_survivors(logits, [opts(top_p=top_p)]) == [expected]


def test_top_p_keeps_ties_of_the_last_kept_token():
    logits = logits_of_probs([0.4, 0.2, 0.2, 0.2])
    # 0.4 then one 0.2 reach 0.5; the other two 0.2 tie with it
    assert top_k_top_p_survivors(logits, [opts(top_p=0.5)]) == [{0, 1, 2, 3}]
    assert top_k_top_p_survivors(logits, [opts(top_p=0.3)]) == [{0}]


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = logits_of_probs([0.5, 0.3, 0.15, 0.05])
    # after top-3 the masses are 0.526, 0.316, 0.158: 0.842 before the third >= 0.83
    assert top_k_top_p_survivors(logits, [opts(top_k=3, top_p=0.83)]) == [{0, 1}]
    # without top-k only 0.8 comes before the third token
    assert top_k_top_p_survivors(logits, [opts(top_p=0.83)]) == [{0, 1, 2}]


def test_top_k_and_top_p_rows_in_one_batch():
    row = [0.5, 0.3, 0.15, 0.05]
    logits = logits_of_probs(row, row, row)
    options = [opts(top_k=1), opts(top_p=0.7), opts()]
    assert top_k_top_p_survivors(logits, options) == [{0}, {0, 1}, {0, 1, 2, 3}]


def test_top_p_within_top_k_needs_no_full_sort():
    row = [0.5, 0.3, 0.15, 0.05, 0.0001]
    logits = logits_of_probs(row, row, row)
    options = [opts(top_k=3, top_p=0.83), opts(top_k=2), opts()]
    assert make_batch(options, 5).top_p_within_top_k
    assert top_k_top_p_survivors(logits, options) == [{0, 1}, {0, 1}, set(range(5))]


def test_truncated_and_full_sort_top_p_agree():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    ks = torch.randint(1, 60, (64,), generator=gen).tolist()
    ps = torch.rand(64, generator=gen).tolist()
    options = [opts(top_k=k, top_p=max(p, 0.05)) for k, p in zip(ks, ps, strict=True)]
    options[3] = opts(top_k=7)  # a row without top-p
    options[5] = opts()  # and one with neither
    batch = make_batch(options, 300)
    assert batch.top_p_within_top_k
    truncated = logits.clone()
    apply_top_k_top_p(truncated, batch)
    batch.top_p_within_top_k = False
    full = logits.clone()
    apply_top_k_top_p(full, batch)
    assert kept(truncated) == kept(full)
    assert len(kept(full)[3]) == 7 and len(kept(full)[5]) == 300


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.0, {0, 1, 2, 3}), (0.11, {0, 1, 2}), (0.25, {0, 1, 2}), (0.5, {0, 1}), (1.0, {0})],
)
def test_min_p_keeps_tokens_above_a_fraction_of_the_best(min_p, expected):
    logits = logits_of_probs([0.5, 0.3, 0.15, 0.05])
    batch = make_batch([opts(min_p=min_p)], vocab_size=4)
    probs = torch.softmax(logits, dim=-1)
    if batch.min_p is not None:
        apply_min_p(probs, batch.min_p)
    assert [set(torch.nonzero(row).flatten().tolist()) for row in probs] == [expected]


def test_sampling_draws_only_surviving_tokens():
    logits = logits_of_probs(*[[0.3, 0.25, 0.2, 0.15, 0.1]] * 300)
    torch.manual_seed(0)
    assert set(sample(logits, [opts(top_k=2)] * 300)) == {0, 1}
    assert set(sample(logits, [opts(top_p=0.6)] * 300)) == {0, 1, 2}
    assert set(sample(logits, [opts(min_p=0.6)] * 300)) == {0, 1, 2}


# ---- logits processors and penalties -----------------------------------------------------


def processed(logits: torch.Tensor, options: list[SamplingOptions], **kwargs) -> list[list[float]]:
    batch = make_batch(options, logits.shape[1], **kwargs)
    return apply_logits_processors(logits, batch).tolist()


def test_logit_bias_adds_to_the_named_tokens():
    out = processed(torch.zeros(2, 6), [opts(logit_bias={1: 2.5, 4: -100.0}), opts()])
    assert out == [[0.0, 2.5, 0.0, 0.0, -100.0, 0.0], [0.0] * 6]


def test_allowed_token_ids_mask_every_other_token():
    out = processed(torch.zeros(2, 6), [opts(), opts(allowed_token_ids=[2, 5])])
    assert out == [[0.0] * 6, [NEG_INF, NEG_INF, 0.0, NEG_INF, NEG_INF, 0.0]]


def test_logit_bias_comes_before_allowed_token_ids():
    out = processed(torch.zeros(1, 4), [opts(logit_bias={0: 1.0, 1: 3.0}, allowed_token_ids=[1])])
    assert out == [[NEG_INF, 3.0, NEG_INF, NEG_INF]]


@pytest.mark.parametrize(
    ("output", "banned"),
    [
        ([], {3}),  # one-token words always; longer prefixes cannot match yet
        ([1], {3, 2}),
        ([1, 4, 5], {3, 0}),
        ([4, 5, 1], {3, 2}),
        ([5], {3}),
    ],
)
def test_bad_words_ban_the_last_token_after_the_prefix(output, banned):
    bad_words = [[3], [1, 2], [4, 5, 0]]
    out = processed(torch.zeros(1, 6), [opts(bad_words_token_ids=bad_words)], outputs=[output])
    assert {i for i, x in enumerate(out[0]) if x == NEG_INF} == banned


def test_min_tokens_masks_stop_ids_until_enough_outputs():
    options = [opts(min_tokens=2, stop_token_ids=[5, 1])] * 3
    out = processed(torch.zeros(3, 6), options, outputs=[[], [0], [0, 0]])
    assert out[0] == [0.0, NEG_INF, 0.0, 0.0, 0.0, NEG_INF]
    assert out[1] == [0.0, NEG_INF, 0.0, 0.0, 0.0, NEG_INF]
    assert out[2] == [0.0] * 6


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.0]] * 2)
    options = [
        opts(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        opts(),  # a neighbour without penalties is untouched
    ]
    out = processed(logits, options, prompts=[[0, 3], [0]], outputs=[[2, 2, 4], [1]])
    # seen {0, 2, 3, 4}: positive / 2, negative * 2 -> [1, -1, .25, -1, .5, 0]
    # output counts {2: 2, 4: 1}: minus 0.5 * count, minus 0.25 if present
    assert out[0] == [1.0, -1.0, -1.0, -1.0, -0.25, 0.0]
    assert out[1] == [2.0, -1.0, 0.5, -0.5, 1.0, 0.0]


def test_frequency_and_presence_penalties_ignore_the_prompt():
    logits = torch.zeros(2, 6)
    options = [opts(frequency_penalty=1.0), opts(presence_penalty=-0.5)]
    out = processed(logits, options, prompts=[[0, 1], [0, 1]], outputs=[[3, 3, 3], [2, 2]])
    assert out == [[0.0, 0.0, 0.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]]


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    out = processed(logits, [opts(repetition_penalty=4.0)], prompts=[[0, 3]], outputs=[[4]])
    assert out == [[0.25, 1.0, 1.0, -4.0, -4.0, -1.0]]


# ---- random sampling ------------------------------------------------------------------


def frequencies(tokens: list[int], vocab_size: int) -> list[float]:
    return [tokens.count(t) / len(tokens) for t in range(vocab_size)]


def test_unseeded_samples_follow_the_distribution():
    probs = [0.1, 0.2, 0.3, 0.4]
    torch.manual_seed(1234)  # fixed, so the check cannot flake
    tokens = sample(logits_of_probs(*[probs] * 2000), [opts()] * 2000)
    assert frequencies(tokens, 4) == pytest.approx(probs, abs=0.035)


def test_temperature_flattens_the_distribution():
    probs = [0.1, 0.2, 0.3, 0.4]
    tempered = [math.sqrt(p) for p in probs]  # softmax(log p / 2) is proportional to sqrt(p)
    expected = [p / sum(tempered) for p in tempered]
    torch.manual_seed(99)
    tokens = sample(logits_of_probs(*[probs] * 2000), [opts(temperature=2.0)] * 2000)
    assert frequencies(tokens, 4) == pytest.approx(expected, abs=0.035)


def test_seeded_rows_follow_the_distribution():
    probs = [0.1, 0.2, 0.3, 0.4]
    generators = {i: make_generator(i, "cpu") for i in range(2000)}
    tokens = sample(
        logits_of_probs(*[probs] * 2000), [opts(seed=i) for i in range(2000)], generators=generators
    )
    assert frequencies(tokens, 4) == pytest.approx(probs, abs=0.035)


def test_the_cpu_draw_picks_only_tokens_of_nonzero_probability():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 4)
    u = torch.tensor([[0.0], [0.2499], [0.2501], [1.0]])  # 1.0: past any uniform draw
    assert pick_by_cdf(probs.clone(), u).tolist() == [1, 1, 3, 3]
    # a row that does not sum to one (min-p zeroed some): u scales to its total
    zeroed = torch.tensor([[0.0, 0.2, 0.0, 0.1]] * 2)
    assert pick_by_cdf(zeroed, torch.tensor([[0.6], [0.7]])).tolist() == [1, 3]


def seeded_run(row: int, num_rows: int, steps: int = 6) -> list[int]:
    """Tokens of a request with seed 7 sitting at `row` of a batch of strangers."""
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(steps, 40, generator=generator)  # the request's logits per step
    # even neighbours are seeded, every third is greedy, the rest draw unseeded
    seeds = {r: 1000 + r for r in range(num_rows) if r % 2 == 0} | {row: 7}
    generators = {r: make_generator(seed, "cpu") for r, seed in seeds.items()}
    options = [
        opts(temperature=0.0)
        if r % 3 == 1 and r != row
        else opts(seed=seeds.get(r), temperature=0.8)
        for r in range(num_rows)
    ]
    torch.manual_seed(row * 31 + num_rows)  # unseeded neighbours draw differently each run
    tokens: list[int] = []
    for step in range(steps):
        logits = torch.randn(num_rows, 40)
        logits[row] = target[step]
        batch = make_batch(options, 40, generators=generators)
        tokens.append(int(Sampler()(logits, batch).token_ids[row]))
    return tokens


def test_seeded_request_ignores_batch_neighbours_and_row():
    alone = seeded_run(row=0, num_rows=1)
    assert seeded_run(row=2, num_rows=5) == alone
    assert seeded_run(row=0, num_rows=4) == alone
    assert seeded_run(row=6, num_rows=7) == alone


def test_different_seeds_draw_differently():
    logits = torch.zeros(1, 1000)
    first = sample(logits, [opts(seed=1)], generators={0: make_generator(1, "cpu")})
    second = sample(logits, [opts(seed=2)], generators={0: make_generator(2, "cpu")})
    again = sample(logits, [opts(seed=1)], generators={0: make_generator(1, "cpu")})
    assert first == again and first != second


# ---- logprobs -------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 2.0, -1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    options = [
        # greedy, but the bias forces token 3: its logprob and rank are the raw ones
        opts(temperature=0.0, logit_bias={3: 10.0}, logprobs=2),
        opts(temperature=0.0, repetition_penalty=4.0),
        opts(temperature=0.0, logprobs=0),
    ]
    batch = make_batch(options, 4, prompts=[[], [1], []])
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [3, 3, 0]
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None
    ids, values, ranks = out.logprobs
    assert ids[:2].tolist() == [[3, 0, 2], [3, 1, 3]]
    # row 2's top two tie, so topk may list them in either order
    assert ids[2, 0].item() == 0 and set(ids[2, 1:].tolist()) == {0, 1}
    assert torch.equal(values, raw.gather(1, ids))
    # rank 1 + the number of strictly more likely tokens; the tie in row 2 shares rank 1
    assert ranks.tolist() == [4, 2, 1]


def test_logprobs_to_wire_trims_each_row_to_its_request():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 2.0, -1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    options = [
        opts(temperature=0.0, logprobs=2),
        opts(temperature=0.0),
        opts(temperature=0.0, logprobs=0),
    ]
    out = Sampler()(logits, make_batch(options, 4))
    assert out.logprobs is not None
    wire = logprobs_to_wire(out.logprobs, [o.logprobs for o in options])
    raw = torch.log_softmax(logits, dim=-1).tolist()
    assert wire[1] is None
    assert wire[0] == Logprobs(
        token_ids=[[0, 0, 2]], logprobs=[[raw[0][0], raw[0][0], raw[0][2]]], ranks=[1]
    )
    assert wire[2] == Logprobs(token_ids=[[0]], logprobs=[[raw[2][0]]], ranks=[1])


def test_prompt_logprobs_rank_each_target():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    result = compute_prompt_logprobs(logits, torch.tensor([0, 0, 2]), k=1)
    raw = torch.log_softmax(logits, dim=-1).tolist()
    assert result.token_ids == [[0, 2], [0, 0], [2, 0]]
    assert result.ranks == [3, 1, 1]
    assert result.logprobs == [
        [raw[0][0], raw[0][2]],
        [raw[1][0], raw[1][0]],
        [raw[2][2], raw[2][0]],
    ]


def test_token_counts_accept_numpy_rows():
    batch = make_batch(
        [opts(presence_penalty=0.5)] * 2,
        vocab_size=4,
        prompts=[np.array([0]), np.array([1])],
        outputs=[np.array([3, 3]), np.array([], dtype=np.int64)],
    )
    assert batch.penalties is not None
    assert batch.penalties.output_counts.tolist() == [[0, 0, 0, 2], [0, 0, 0, 0]]


def test_token_counts_for_penalties_are_exact():
    batch = make_batch(
        [opts(frequency_penalty=1.0), opts(), opts(repetition_penalty=1.1)],
        vocab_size=5,
        prompts=[[0], [1], [4, 4]],
        outputs=[[1, 1, 3], [2], []],
    )
    penalties = batch.penalties
    assert penalties is not None
    assert penalties.rows.tolist() == [0, 2]
    assert penalties.output_counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert penalties.seen is not None
    assert penalties.seen.tolist() == [
        [True, True, False, True, False],
        [False, False, False, False, True],
    ]


# ---- on a GPU, when one is at hand ----------------------------------------------------


def gpu_case() -> tuple[list[SamplingOptions], list[list[int]], list[list[int]], torch.Tensor]:
    options = [
        opts(temperature=0.0, logit_bias={1: 5.0}, logprobs=2),
        opts(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3, repetition_penalty=1.3),
        opts(
            allowed_token_ids=[2, 3, 4, 7, 9],
            bad_words_token_ids=[[7], [8, 9]],
            min_tokens=3,
            stop_token_ids=[3],
            frequency_penalty=0.2,
            presence_penalty=0.1,
            logprobs=0,
        ),
        opts(temperature=0.0, repetition_penalty=1.5, top_k=4),
    ]
    prompts = [[5, 6], [1, 2, 2], [3], [10, 11, 12]]
    outputs = [[], [4, 4], [8, 5], [12]]
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    return options, prompts, outputs, logits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_matches_cpu_without_host_syncs():
    options, prompts, outputs, logits = gpu_case()
    cpu_batch = make_batch(options, 64, prompts=prompts, outputs=outputs)
    gpu_batch = SamplingBatch.build(
        options, prompts, outputs, {1: make_generator(3, "cuda")}, 64, "cuda"
    )
    gpu_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the sampler raises
    try:
        out = Sampler()(gpu_logits, gpu_batch)
        processed_gpu = apply_logits_processors(gpu_logits, gpu_batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = apply_logits_processors(logits, cpu_batch)
    assert torch.allclose(processed_gpu.cpu(), expected, atol=1e-5)
    tokens = out.token_ids.tolist()
    assert tokens[0] == expected[0].argmax().item() and tokens[3] == expected[3].argmax().item()
    assert tokens[2] in {2, 4, 9}  # allowed, minus the bad word 7 and the min_tokens stop 3
    assert out.logprobs is not None and out.logprobs.token_ids[:, 0].tolist() == tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seeded_row_ignores_its_neighbours():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(9)).cuda()
    alone = SamplingBatch.build(
        [opts(seed=4)], [[]], [[]], {0: make_generator(4, "cuda")}, 1000, "cuda"
    )
    first = Sampler()(logits[2:3], alone).token_ids.tolist()
    options = [opts()] * 2 + [opts(seed=4)] + [opts(temperature=0.0)] * 3
    crowded = SamplingBatch.build(
        options, [[]] * 6, [[]] * 6, {2: make_generator(4, "cuda")}, 1000, "cuda"
    )
    assert Sampler()(logits, crowded).token_ids.tolist()[2] == first[0]


# ---- the fused path (kernels.sampling) -------------------------------------------------


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton kernels on CPU tensors (interpreted), as on a GPU."""
    monkeypatch.setenv("TESSERA_KERNELS", "triton")


@pytest.mark.parametrize(
    "options",
    [
        [opts(), opts(temperature=0.7)],
        [opts(temperature=0.0, top_k=2, min_p=0.3), opts(temperature=1.5)],  # greedy: ignored
        [opts(temperature=0.0)] * 2,
    ],
)
def test_temperature_only_batches_take_the_fused_path(triton_kernels, options):
    batch = make_batch(options, vocab_size=6)
    assert batch.fused is not None and batch.temperature is None
    inv = [0.0 if o.temperature == 0.0 else 1 / o.temperature for o in options]
    assert batch.fused.inv_temperature.tolist() == pytest.approx(inv)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        (opts(top_k=3), {}),
        (opts(top_p=0.9), {}),
        (opts(min_p=0.1), {}),
        (opts(logprobs=1), {}),
        (opts(presence_penalty=0.5), {}),
        (opts(logit_bias={1: 1.0}), {}),
        (opts(seed=3), {"generators": {1: make_generator(3, "cpu")}}),
    ],
)
def test_any_other_option_keeps_the_full_sampler(triton_kernels, option, kwargs):
    batch = make_batch([opts(), option], vocab_size=6, **kwargs)
    assert batch.fused is None


def test_no_fused_path_where_the_references_run():
    assert make_batch([opts()], vocab_size=6).fused is None  # CPU, TESSERA_KERNELS unset


def test_fused_sampler_draws_from_the_distribution(triton_kernels):
    probs = [0.1, 0.2, 0.3, 0.4]
    rows = 240  # interpreted: each row is two kernel programs
    logits = logits_of_probs(*[probs] * rows).to(torch.bfloat16)  # its own dtype, no copy
    options = [opts(temperature=0.0 if r % 4 == 0 else 1.0) for r in range(rows)]
    torch.manual_seed(21)
    tokens = sample(logits, options)
    assert all(tokens[r] == 3 for r in range(0, rows, 4))  # greedy rows: the argmax
    drawn = [t for r, t in enumerate(tokens) if r % 4]
    assert frequencies(drawn, 4) == pytest.approx(probs, abs=0.08)
    torch.manual_seed(21)  # the step seed comes from torch's generator: runs repeat
    assert sample(logits, options) == tokens


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (opts(), True),
        (opts(temperature=0.0, top_k=3), False),  # per row; the batch decides greedy apart
        (opts(temperature=0.3), True),
        (opts(min_tokens=2, stop_token_ids=[5]), False),
        (opts(min_tokens=2), True),  # nothing to mask without stop ids
        (opts(bad_words_token_ids=[[1]]), False),
        (opts(allowed_token_ids=[1, 2]), False),
        (opts(repetition_penalty=1.1), False),
        (opts(seed=1), False),
        (opts(logprobs=0), False),
    ],
)
def test_temperature_only_screens_each_row(option, expected):
    assert temperature_only(option) is expected


def test_a_caller_that_knows_the_rows_are_plain_gets_the_same_batch(triton_kernels):
    options = [opts(), opts(temperature=0.0), opts(temperature=2.0)]
    told = SamplingBatch.build(options, [[]] * 3, [[]] * 3, {}, 6, "cpu", all_temperature_only=True)
    found = make_batch(options, vocab_size=6)
    assert told.fused is not None and found.fused is not None
    assert told.fused.inv_temperature.tolist() == found.fused.inv_temperature.tolist()
