"""The worker's sampler: logits of one step -> one token per request (and logprobs).

The model runner builds one `SamplingBatch` per step from the `SamplingOptions` of the
requests in the batch (row i = request i), then calls `Sampler()(logits, batch)`.

The order of operations, per row:
  logit_bias, allowed_token_ids, bad_words, min_tokens (stop ids masked),
  penalties (repetition over prompt + output, frequency and presence over output),
  then greedy rows take the argmax; random rows apply temperature, top-k, top-p and
  min-p, and draw with the exponential race: argmax(probs / E), E ~ Exponential(1);
  on the CPU, where an exponential per token costs more than the model's step, by
  one uniform per row against the running sum. Either way a seeded request draws
  from its own generator, so that its tokens do not depend on its neighbours in the
  batch or on its row.

Top-k and top-p keep every token tied with the last one kept, so a row's surviving set
does not depend on how a sort orders equal values. Logprobs are those of the raw
model distribution (log_softmax of the logits before any of the above), as in vLLM.

Where the Triton kernels run (CUDA), a batch whose random rows have nothing but a
temperature (no top-k, top-p, min-p, seed, logprobs, penalties, bias or bans) skips all
of the above: kernels.sampling draws every row in one pass over the logits, the race
with hashed noise in place of the generator's (`FusedSampling`). A seeded request never
takes that path, so its tokens still come from its own generator alone.

Per-row Python work happens only in `SamplingBatch.build` and only for the rare
per-row options; `Sampler.__call__` makes no host syncs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from executor.messages import Logprobs, SamplingOptions
from executor.transfer import to_device
from kernels.dispatch import use_triton_on
from kernels.sampling import SEED_LIMIT, sample_tokens

# Below this temperature a row is greedy (matches engine_core.sampling_params).
GREEDY_EPS = 1e-5
# top_p for rows without top-p: above 1, so that rounding in the cumulative sum
# (which may pass 1.0) never drops the tail of the distribution.
_TOP_P_OFF = 2.0


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own generator, which the model runner keeps across steps."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class Penalties:
    """Penalty inputs for the rows that use any penalty (P of the S rows)."""

    rows: torch.Tensor  # [P] int64, batch rows
    presence: torch.Tensor  # [P, 1] float32
    frequency: torch.Tensor  # [P, 1] float32
    repetition: torch.Tensor  # [P, 1] float32
    output_counts: torch.Tensor  # [P, V] float32, occurrences of each token in the output
    # [P, V] bool, token seen in prompt or output; None when no row has a repetition penalty
    seen: torch.Tensor | None


@dataclass
class FusedSampling:
    """Inputs of kernels.sampling.sample_tokens for one step."""

    inv_temperature: torch.Tensor  # [S] float32; 0 for greedy rows
    step_seed: int  # the rows' noise keys derive from it

    @classmethod
    def build(
        cls, options: Sequence[SamplingOptions], greedy: list[bool], device: torch.device | str
    ) -> FusedSampling:
        inv = [0.0 if g else 1.0 / o.temperature for o, g in zip(options, greedy, strict=True)]
        # A new seed per step from torch's default generator, which the worker seeds
        # with --seed: runs repeat, and every tensor-parallel rank draws the same.
        step_seed = int(torch.randint(0, SEED_LIMIT, (1,), dtype=torch.int64))
        return cls(to_device(torch.tensor(inv, dtype=torch.float32), device), step_seed)


@dataclass
class SamplingBatch:
    """Per-step sampling inputs, one row per request. Built by `SamplingBatch.build`.

    A field is None when no row needs it, so that the common cases skip the work.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy: torch.Tensor | None = None  # [S] bool, only for mixed batches
    temperature: torch.Tensor | None = None  # [S, 1] float32; greedy rows 1.0
    top_k: torch.Tensor | None = None  # [S] int64 in [1, V]; rows without top-k: V
    max_top_k: int = 0  # the largest top_k among rows that use top-k
    # every row that uses top-p also uses top-k: top-p then needs no full sort
    top_p_within_top_k: bool = False
    top_p: torch.Tensor | None = None  # [S, 1] float32; rows without top-p: 2.0
    min_p: torch.Tensor | None = None  # [S, 1] float32; rows without min-p: 0.0
    penalties: Penalties | None = None
    # logit_bias entries: (rows [B], token ids [B], values [B])
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # allowed_token_ids: (rows [A], mask [A, V] bool, True = allowed)
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None
    # bad-word and min_tokens bans: (rows [N], token ids [N]) set to -inf
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    # (row, generator) of seeded random rows; other random rows use the default generator
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)
    any_unseeded_random: bool = False
    max_num_logprobs: int | None = None  # k of the top-k logprobs; None = no logprobs
    fused: FusedSampling | None = None  # set: one kernel samples, the fields above unused

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def no_penalties(self) -> bool:
        return self.penalties is None

    @classmethod
    def build(
        cls,
        options: Sequence[SamplingOptions],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: dict[int, torch.Generator],
        vocab_size: int,
        device: torch.device | str,
        all_temperature_only: bool | None = None,
    ) -> SamplingBatch:
        """Gather the step's sampling inputs.

        options[i], prompt_ids[i] and output_ids[i] belong to row i; generators maps a
        row to its request's generator (rows of seeded requests). prompt_ids and
        output_ids are read only for rows that use penalties, bad words or min_tokens.
        all_temperature_only: whether `temperature_only` holds for every row, when the
        caller keeps that per request (None: found here, a pass over the rows).
        """
        greedy = [o.temperature < GREEDY_EPS for o in options]
        all_greedy, all_random = all(greedy), not any(greedy)
        batch = cls(
            num_rows=len(options),
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
        )
        # The common step, every row greedy or a bare temperature, skips the per-option
        # builders below, each a walk over every row (0.3 ms at 256 rows).
        plain = all_temperature_only
        if plain is None:
            plain = all(map(temperature_only, options))
        if not plain:
            batch.max_num_logprobs = _max_num_logprobs(options)
            batch.penalties = _build_penalties(options, prompt_ids, output_ids, vocab_size, device)
            batch.logit_bias = _build_logit_bias(options, device)
            batch.allowed = _build_allowed(options, vocab_size, device)
            batch.banned = _build_banned(options, output_ids, device)
        if (plain or batch._fusable(options, greedy, generators)) and use_triton_on(device):
            batch.fused = FusedSampling.build(options, greedy, device)
            return batch
        if not all_greedy:
            batch._set_random_params(options, greedy, generators, device)
        if not all_greedy and not all_random:
            batch.greedy = to_device(torch.tensor(greedy, dtype=torch.bool), device)
        return batch

    def _fusable(
        self,
        options: Sequence[SamplingOptions],
        greedy: list[bool],
        generators: dict[int, torch.Generator],
    ) -> bool:
        """Whether kernels.sampling can draw this step: random rows with a temperature
        alone (the options of greedy rows do not matter), and nothing else to do."""
        if self.max_num_logprobs is not None or self.penalties is not None:
            return False
        if self.logit_bias is not None or self.allowed is not None or self.banned is not None:
            return False
        vocab = self.vocab_size
        return all(
            g or (i not in generators and _random_params(o, vocab)[1:] == (vocab, _TOP_P_OFF, 0.0))
            for i, (o, g) in enumerate(zip(options, greedy, strict=True))
        )

    def _set_random_params(
        self,
        options: Sequence[SamplingOptions],
        greedy: list[bool],
        generators: dict[int, torch.Generator],
        device: torch.device | str,
    ) -> None:
        vocab = self.vocab_size
        # Greedy rows get neutral values: their random path result is discarded.
        rows = [
            _random_params(o, vocab) if not g else (1.0, vocab, _TOP_P_OFF, 0.0)
            for o, g in zip(options, greedy, strict=True)
        ]
        temperature, top_k, top_p, min_p = (list(column) for column in zip(*rows, strict=True))
        # One host-to-device copy for the three float columns.
        params = to_device(
            torch.tensor([temperature, top_p, min_p], dtype=torch.float32), device
        )  # [3, S]
        self.temperature = params[0].unsqueeze(1)
        if any(k < vocab for k in top_k):
            self.top_k = to_device(torch.tensor(top_k, dtype=torch.int64), device)
            self.max_top_k = max(k for k in top_k if k < vocab)
        if any(p < 1.0 for p in top_p):
            self.top_p = params[1].unsqueeze(1)
            self.top_p_within_top_k = all(
                k < vocab for k, p in zip(top_k, top_p, strict=True) if p < 1.0
            )
        if any(p > 0.0 for p in min_p):
            self.min_p = params[2].unsqueeze(1)
        random_rows = [i for i, g in enumerate(greedy) if not g]
        self.seeded = [(i, generators[i]) for i in random_rows if i in generators]
        self.any_unseeded_random = len(self.seeded) < len(random_rows)


def _random_params(o: SamplingOptions, vocab_size: int) -> tuple[float, int, float, float]:
    """(temperature, top_k, top_p, min_p) of a random row, "off" encoded as in SamplingBatch."""
    top_k = vocab_size if o.top_k <= 0 else min(o.top_k, vocab_size)
    top_p = _TOP_P_OFF if o.top_p >= 1.0 else o.top_p
    return o.temperature, top_k, top_p, o.min_p


def _max_num_logprobs(options: Sequence[SamplingOptions]) -> int | None:
    wanted = [o.logprobs for o in options if o.logprobs is not None]
    return max(wanted) if wanted else None


def temperature_only(o: SamplingOptions) -> bool:
    """No sampling option but the temperature (greedy included), no seed, no logprobs."""
    return (
        o.top_k <= 0
        and o.top_p >= 1.0
        and o.min_p <= 0.0
        and o.seed is None
        and o.logprobs is None
        and not o.logit_bias
        and not o.allowed_token_ids
        and not _has_penalty(o)
        and not _may_ban(o)
    )


def _has_penalty(o: SamplingOptions) -> bool:
    return o.presence_penalty != 0.0 or o.frequency_penalty != 0.0 or o.repetition_penalty != 1.0


def _build_penalties(
    options: Sequence[SamplingOptions],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str,
) -> Penalties | None:
    rows = [i for i, o in enumerate(options) if _has_penalty(o)]
    if not rows:
        return None
    values = [
        [options[i].presence_penalty, options[i].frequency_penalty, options[i].repetition_penalty]
        for i in rows
    ]
    params = to_device(torch.tensor(values, dtype=torch.float32), device)  # [P, 3]
    outputs = [output_ids[i] for i in rows]
    counts = _token_counts(outputs, vocab_size, device)  # [P, V]
    seen = None
    if any(options[i].repetition_penalty != 1.0 for i in rows):
        prompt_counts = _token_counts([prompt_ids[i] for i in rows], vocab_size, device)
        seen = (prompt_counts > 0) | (counts > 0)
    return Penalties(
        rows=to_device(torch.tensor(rows, dtype=torch.int64), device),
        presence=params[:, 0:1],
        frequency=params[:, 1:2],
        repetition=params[:, 2:3],
        output_counts=counts,
        seen=seen,
    )


def _token_counts(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each list, counted on the device."""
    num_rows = len(token_lists)
    lengths = [len(ids) for ids in token_lists]
    total = sum(lengths)
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=device)
    if total:
        flat = to_device(torch.from_numpy(_flatten(token_lists, total)), device)  # [N]
        row_of = torch.repeat_interleave(
            torch.arange(num_rows, device=device),
            to_device(torch.tensor(lengths, dtype=torch.int64), device),
            output_size=total,  # known on the host: no device sync
        )  # [N]
        ones = torch.ones(total, dtype=torch.float32, device=device)
        counts.index_add_(0, row_of * vocab_size + flat, ones)
    return counts.view(num_rows, vocab_size)


def _flatten(token_lists: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """All ids in one int64 array; several times faster than torch.tensor on lists."""
    if all(isinstance(ids, np.ndarray) for ids in token_lists):
        return np.concatenate(token_lists).astype(np.int64, copy=False)  # type: ignore[arg-type]
    return np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)


def _build_logit_bias(
    options: Sequence[SamplingOptions], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, o in enumerate(options):
        for token_id, bias in (o.logit_bias or {}).items():
            rows.append(i)
            ids.append(token_id)
            values.append(bias)
    if not rows:
        return None
    return (
        to_device(torch.tensor(rows, dtype=torch.int64), device),
        to_device(torch.tensor(ids, dtype=torch.int64), device),
        to_device(torch.tensor(values, dtype=torch.float32), device),
    )


def _build_allowed(
    options: Sequence[SamplingOptions], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows = [i for i, o in enumerate(options) if o.allowed_token_ids]
    if not rows:
        return None
    local = [j for j, i in enumerate(rows) for _ in options[i].allowed_token_ids or []]
    ids = [t for i in rows for t in options[i].allowed_token_ids or []]
    mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)  # [A, V]
    mask[to_device(torch.tensor(local), device), to_device(torch.tensor(ids), device)] = True
    return to_device(torch.tensor(rows, dtype=torch.int64), device), mask


def _build_banned(
    options: Sequence[SamplingOptions],
    output_ids: Sequence[Sequence[int]],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows: list[int] = []
    ids: list[int] = []
    for i, o in enumerate(options):
        banned = _banned_ids(o, output_ids[i]) if _may_ban(o) else []
        rows += [i] * len(banned)
        ids += banned
    if not rows:
        return None
    return to_device(torch.tensor(rows), device), to_device(torch.tensor(ids), device)


def reads_output_ids(o: SamplingOptions) -> bool:
    """Whether sampling this row reads its output so far (penalties, bad words, min_tokens)."""
    return _has_penalty(o) or _may_ban(o)


def _may_ban(o: SamplingOptions) -> bool:
    return bool(o.bad_words_token_ids) or (o.min_tokens > 0 and bool(o.stop_token_ids))


def _banned_ids(o: SamplingOptions, output: Sequence[int]) -> list[int]:
    """Token ids row `o` may not sample next, given its output so far."""
    banned: list[int] = []
    if o.min_tokens > 0 and len(output) < o.min_tokens:
        banned += o.stop_token_ids or []
    for word in o.bad_words_token_ids or []:
        # The last token of a bad word is banned once the output ends with the rest of it.
        prefix = word[:-1]
        if len(prefix) <= len(output) and list(output[len(output) - len(prefix) :]) == prefix:
            banned.append(word[-1])
    return banned


class LogprobsTensors(NamedTuple):
    """Top-k logprobs of S rows; column 0 is the sampled (or target) token."""

    token_ids: torch.Tensor  # [S, k+1] int64
    logprobs: torch.Tensor  # [S, k+1] float32
    ranks: torch.Tensor  # [S] int64, rank of column 0 (1 = most likely)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: LogprobsTensors | None = None


class Sampler:
    """Picks one token per row of a [S, V] logits tensor under a SamplingBatch."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [S, V]; never modified in place
        if logits.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match the batch "
                f"({batch.num_rows}, {batch.vocab_size})"
            )
        if batch.fused is not None:  # never with logprobs
            token_ids = torch.empty(batch.num_rows, dtype=torch.int64, device=logits.device)
            sample_tokens(logits, batch.fused.inv_temperature, batch.fused.step_seed, token_ids)
            return SamplerOutput(token_ids=token_ids)
        logits = logits.float()
        token_ids = self._sample(logits, batch)
        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        raw = torch.log_softmax(logits, dim=-1)  # [S, V], the unprocessed distribution
        return SamplerOutput(token_ids, gather_logprobs(raw, token_ids, batch.max_num_logprobs))

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        processed = apply_logits_processors(logits, batch)  # [S, V]
        if batch.all_greedy:
            return processed.argmax(dim=-1)
        greedy = None if batch.all_random else processed.argmax(dim=-1)  # [S], before
        # a copy of our own (the processors made one) is scaled in place: one [S, V]
        # temporary fewer at the sampler's peak, which the KV cache budget pays for
        sampled = sample_random(processed, batch, in_place=processed is not logits)  # [S]
        if greedy is None:
            return sampled
        assert batch.greedy is not None
        return torch.where(batch.greedy, greedy, sampled)


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, allowed_token_ids, bans (bad words, min_tokens), then penalties.

    Returns a new tensor when anything applies; the input is left untouched.
    """
    if (
        batch.logit_bias is None
        and batch.allowed is None
        and batch.banned is None
        and batch.penalties is None
    ):
        return logits
    logits = logits.clone()  # [S, V]
    if batch.logit_bias is not None:
        rows, ids, values = batch.logit_bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if batch.allowed is not None:
        rows, allowed = batch.allowed
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    if batch.banned is not None:
        rows, ids = batch.banned
        # a device-side value: index_put_ of a Python scalar syncs with the host on CUDA
        logits.index_put_((rows, ids), logits.new_full((), float("-inf")))
    if batch.penalties is not None:
        apply_penalties(logits, batch.penalties)
    return logits


def apply_penalties(logits: torch.Tensor, p: Penalties) -> None:
    """In place, on the rows p.rows of logits [S, V].

    repetition: tokens seen in prompt or output have positive logits divided by the
    penalty and negative ones multiplied; frequency: minus count * f; presence: minus
    p for every token present in the output.
    """
    rows = logits[p.rows]  # [P, V], a copy changed in place (one [P, V] temporary at most)
    if p.seen is not None:
        positive = rows > 0
        # x * 1 and x / 1 are exact: the same values as a where() of the two results
        rows.mul_(torch.where(p.seen & ~positive, p.repetition, 1.0))
        rows.div_(torch.where(p.seen & positive, p.repetition, 1.0))
        del positive
    rows.sub_(p.frequency * p.output_counts)  # not addcmul_: a fused multiply-add rounds once
    rows.sub_(torch.where(p.output_counts > 0, p.presence, 0.0))
    logits[p.rows] = rows


def sample_random(
    logits: torch.Tensor, batch: SamplingBatch, in_place: bool = False
) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row (the exponential race;
    on the CPU, inverse_cdf_draw): [S]. `in_place`: `logits` may be overwritten (else
    it is left as it was)."""
    assert batch.temperature is not None
    if in_place:
        logits = logits.div_(batch.temperature)
    else:
        logits = logits / batch.temperature  # [S, V], a new tensor we may change in place
    if batch.top_k is not None or batch.top_p is not None:
        apply_top_k_top_p(logits, batch)
    probs = torch.softmax(logits, dim=-1)  # [S, V]
    del logits  # a scaled copy of our own is freed here, before the temporaries below
    if batch.min_p is not None:
        apply_min_p(probs, batch.min_p)
    if probs.device.type == "cpu":
        return inverse_cdf_draw(probs, batch)
    # The race needs no renormalisation: argmax(c * p / E) = argmax(p / E).
    noise = exponential_noise(probs, batch)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


def inverse_cdf_draw(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The CPU's draw: one uniform per row against the row's running sum, [S, V] -> [S]
    (`probs` is overwritten; a row need not sum to one). The race's exponential for
    every token of the vocabulary took 39 ms a step at 24 rows of 49,152 on one core;
    this is one pass. A seeded row's uniform comes from its own generator."""
    u = torch.empty(probs.shape[0], 1, dtype=probs.dtype)  # [S, 1]
    return pick_by_cdf(probs, _draw(u, batch, torch.Tensor.uniform_))


def pick_by_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose share of the running sum holds u [S, 1] in [0, 1]:
    [S, V] -> [S]. `probs` is overwritten with its running sum."""
    cdf = probs.cumsum_(dim=-1)  # [S, V], nondecreasing
    total = cdf[:, -1:]  # [S, 1]
    # strictly below the row's total: the pick is a token of nonzero probability
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # first cdf > target


# Rows whose cutoffs are found at once. A sort for top-p holds three [rows, V] copies
# (values and int64 indices), and top-p's sums three more: in chunks of these rows the
# widest sampling's peak, which the KV cache budget pays for, stops growing with the
# batch (max_num_seqs is 1024 on an H100: 0.6 GiB a copy for Qwen3's vocabulary).
CUTOFF_ROWS = 256


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place: set to -inf every token below its row's cutoff logit.

    Tokens equal to the cutoff are kept, so ties at the boundary all survive. Top-p
    keeps the smallest prefix of the sorted distribution (after top-k) whose mass
    reaches p, the token that crosses p included.
    """
    for start in range(0, logits.shape[0], CUTOFF_ROWS):
        rows = slice(start, start + CUTOFF_ROWS)
        part = logits[rows]  # a view: filled in place
        part.masked_fill_(part < _cutoff(part, batch, rows), float("-inf"))


def _cutoff(logits: torch.Tensor, batch: SamplingBatch, rows: slice) -> torch.Tensor:
    """Each row's cutoff logit under its top-k and top-p: [R, V] -> [R, 1]."""
    top_k = batch.top_k[rows] if batch.top_k is not None else None
    top_p = batch.top_p[rows] if batch.top_p is not None else None
    if top_k is not None and (top_p is None or batch.top_p_within_top_k):
        # Every candidate lies within the batch's largest k: topk is far cheaper than a sort.
        # (Only a tie of more than K logits at a row's k-th value could change its top-p.)
        candidates = logits.topk(batch.max_top_k, dim=-1).values  # [R, K], descending
    else:
        candidates = logits.sort(dim=-1, descending=True).values  # [R, V]
    cutoff = None
    if top_k is not None:
        cutoff = _top_k_cutoff(candidates, top_k)  # [R, 1]
    if top_p is not None:
        if cutoff is not None:
            candidates.masked_fill_(candidates < cutoff, float("-inf"))
        cutoff_p = _top_p_cutoff(candidates, top_p)  # [R, 1]
        cutoff = cutoff_p if cutoff is None else torch.maximum(cutoff, cutoff_p)
    assert cutoff is not None
    return cutoff


def _top_k_cutoff(candidates: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The k-th largest logit per row: [S, K] descending, [S] -> [S, 1]; -inf if off."""
    width = candidates.shape[1]
    cutoff = candidates.gather(1, (top_k.clamp(max=width) - 1).unsqueeze(1))  # [S, 1]
    # a row whose k exceeds the candidates has top-k off (k = V)
    return cutoff.masked_fill((top_k > width).unsqueeze(1), float("-inf"))


def _top_p_cutoff(candidates: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest logit of each row's top-p prefix: [S, K] descending -> [S, 1]."""
    probs = torch.softmax(candidates, dim=-1)  # [S, K]
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # [S, K], exclusive cumsum
    del probs
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True)  # [S, 1], >= 1 since p > 0
    cutoff = candidates.gather(1, num_kept - 1)  # [S, 1]
    # rows without top-p (p > 1) keep everything, also beyond a truncated candidate list
    return cutoff.masked_fill(top_p > 1.0, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: zero the probabilities below min_p times the row's largest: [S, V]."""
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # [S, 1]
    probs.masked_fill_(probs < threshold, 0.0)


def exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[S, V] Exponential(1) draws; a seeded row's from its own generator only."""
    noise = _draw(torch.empty_like(probs), batch, torch.Tensor.exponential_)
    # A draw of exactly 0 would make p / E inf (or nan for p = 0) and break the argmax.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _draw(out: torch.Tensor, batch: SamplingBatch, fill: Callable[..., Any]) -> torch.Tensor:
    """`out` [S, ...] filled in place by `fill` (a Tensor method taking generator=): every
    row from the default generator when some random row is unseeded, then each seeded
    row again from its own generator alone."""
    if batch.any_unseeded_random:
        fill(out)
    for row, generator in batch.seeded:
        fill(out[row], generator=generator)
    return out


def gather_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Column 0: token_ids' logprobs; columns 1..k: the top-k. raw: [S, V] log_softmax."""
    chosen = raw.gather(1, token_ids.unsqueeze(1))  # [S, 1]
    # rank 1 = the most likely token; ties share the better rank
    ranks = (raw > chosen).sum(dim=-1) + 1  # [S]
    if k == 0:
        return LogprobsTensors(token_ids.unsqueeze(1), chosen, ranks)
    top_values, top_ids = raw.topk(k, dim=-1)  # [S, k]
    return LogprobsTensors(
        token_ids=torch.cat([token_ids.unsqueeze(1), top_ids], dim=1),
        logprobs=torch.cat([chosen, top_values], dim=1),
        ranks=ranks,
    )


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> Logprobs:
    """Logprobs of prompt tokens: logits[i] [N, V] predicts target_ids[i] [N]."""
    raw = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    tensors = gather_logprobs(raw, target_ids.to(torch.int64), k)
    return Logprobs(
        token_ids=tensors.token_ids.tolist(),
        logprobs=tensors.logprobs.tolist(),
        ranks=tensors.ranks.tolist(),
    )


def logprobs_to_wire(
    tensors: LogprobsTensors, num_logprobs: Sequence[int | None]
) -> list[Logprobs | None]:
    """Split a step's logprobs into one single-position Logprobs per row.

    num_logprobs[i]: the k row i asked for (None = none); rows asking for fewer than
    the batch's k are trimmed. One host copy per tensor for the whole batch.
    """
    ids = tensors.token_ids.tolist()
    values = tensors.logprobs.tolist()
    ranks = tensors.ranks.tolist()
    out: list[Logprobs | None] = []
    for i, k in enumerate(num_logprobs):
        if k is None:
            out.append(None)
            continue
        out.append(
            Logprobs(token_ids=[ids[i][: k + 1]], logprobs=[values[i][: k + 1]], ranks=[ranks[i]])
        )
    return out
