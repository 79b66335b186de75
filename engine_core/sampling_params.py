"""The user-facing sampling parameters of a request, with vLLM's fields and defaults.

`SamplingParams` is what the API server and the offline `LLM` build from a request.
It checks itself on construction (and on decoding); `validate` adds the checks that
need the model (vocabulary size, --max-logprobs). `with_generation_defaults` lets the
model's generation_config fill the fields a caller left unset, and `to_options`
reduces the parameters to the `SamplingOptions` that cross to the workers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from executor.messages import SamplingOptions

# Below this temperature a request is greedy (argmax), as in vLLM.
GREEDY_EPS = 1e-5

# generation_config keys a model may use to default a request's unset fields.
GENERATION_CONFIG_FIELDS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def seed_fits(seed: int) -> bool:
    """Whether a seed fits torch's generators and msgpack: [-2**63, 2**64)."""
    return -(2**63) <= seed < 2**64


def generation_defaults_problem(gen_cfg: dict[str, Any]) -> str | None:
    """Why a generation config's values could not default a request, or None."""
    fields: dict[str, Any] = {}
    for key, name in GENERATION_CONFIG_FIELDS.items():
        value = gen_cfg.get(key)
        if value is None:
            continue
        integer = name in ("top_k", "max_tokens")
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            return f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}"
        fields[name] = value
    try:
        SamplingParams(**fields)
    except ValueError as error:
        return f"as a request default: {error}"
    return None


class RequestOutputKind(enum.IntEnum):
    """What each streamed output of a request carries."""

    CUMULATIVE = 0  # all text and tokens so far
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # nothing until the request finishes


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to sample a request's output tokens (vLLM's fields and defaults).

    top_k -1 is accepted for "off" and normalised to 0; a temperature below 1e-5 is
    greedy, and then top_p, top_k and min_p are reset to their neutral values.
    Construction raises ValueError naming the offending field.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per output token
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Fields the caller left unset (see `from_optional`), which the model's generation
    # config may still fill. Empty for a SamplingParams built directly: there every
    # field counts as chosen, as with vLLM's offline LLM.
    unset_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self._normalise()
        self._check()

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from optional values, None meaning "not set by the caller".

        Unset fields take vLLM's defaults; those a generation config can supply are
        remembered in `unset_fields` for `with_generation_defaults`.
        """
        given = {name: value for name, value in kwargs.items() if value is not None}
        unset = frozenset(name for name in GENERATION_CONFIG_FIELDS.values() if name not in given)
        return cls(**given, unset_fields=unset)

    def with_generation_defaults(self, gen_cfg: dict[str, Any]) -> SamplingParams:
        """Return a copy whose unset fields take the model's generation config values.

        Only fields in `unset_fields` change, except max_new_tokens, which also caps
        an explicit max_tokens (vLLM's server does the same).
        """
        updates: dict[str, Any] = {}
        for key, name in GENERATION_CONFIG_FIELDS.items():
            value = gen_cfg.get(key)
            if value is not None and name in self.unset_fields:
                updates[name] = value
        cap = gen_cfg.get("max_new_tokens")
        if cap is not None and "max_tokens" not in updates:
            if self.max_tokens is None or self.max_tokens > cap:
                updates["max_tokens"] = cap
        return msgspec.structs.replace(self, **updates, unset_fields=frozenset())

    # ---- derived values -----------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        # __post_init__ turns a single string into a list
        return list(self.stop or [])

    @property
    def output_text_buffer_length(self) -> int:
        """Characters to hold back while streaming, so a stop string is never shown."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    def all_stop_token_ids(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        """stop_token_ids plus the EOS id(s) unless ignore_eos, without duplicates."""
        ids = list(self.stop_token_ids or [])
        if not self.ignore_eos:
            ids += _as_list(eos_token_id)
        return list(dict.fromkeys(ids))

    def to_options(
        self,
        eos_token_id: int | Sequence[int] | None = None,
        bad_words_token_ids: list[list[int]] | None = None,
    ) -> SamplingOptions:
        """The part of these parameters the worker's sampler needs.

        bad_words_token_ids: `bad_words` tokenized by the caller (the worker has no
        tokenizer). stop_token_ids are for the engine core's stop check; with
        min_tokens the EOS ids join them (unless ignored) for the sampler's mask.
        """
        greedy = self.is_greedy
        return SamplingOptions(
            temperature=0.0 if greedy else float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            min_p=float(self.min_p),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            # a greedy row draws no noise, so its worker needs no generator
            seed=None if greedy else self.seed,
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            allowed_token_ids=list(self.allowed_token_ids) if self.allowed_token_ids else None,
            bad_words_token_ids=[list(w) for w in bad_words_token_ids if w]
            if bad_words_token_ids
            else None,
            min_tokens=self.min_tokens,
            stop_token_ids=self._stop_ids_for_workers(eos_token_id),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _stop_ids_for_workers(self, eos_token_id: int | Sequence[int] | None) -> list[int] | None:
        if self.min_tokens:
            return self.all_stop_token_ids(eos_token_id)
        return list(self.stop_token_ids) if self.stop_token_ids else None

    # ---- checks -------------------------------------------------------------------

    def validate(self, max_logprobs: int | None = None, vocab_size: int | None = None) -> None:
        """Checks that need the model: logprob counts and token ids in the vocabulary."""
        if max_logprobs is not None:
            for name in ("logprobs", "prompt_logprobs"):
                value = getattr(self, name)
                _require(
                    value is None or value <= max_logprobs,
                    name,
                    f"must be <= max_logprobs ({max_logprobs})",
                    value,
                )
        if vocab_size is not None:
            _check_ids_below("allowed_token_ids", self.allowed_token_ids or [], vocab_size)
            _check_ids_below("logit_bias", (self.logit_bias or {}).keys(), vocab_size)
            _check_ids_below("stop_token_ids", self.stop_token_ids or [], vocab_size)

    def _normalise(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:  # vLLM treats seed -1 as "no seed"
            self.seed = None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.is_greedy:
            # these filters cannot change an argmax; neutral values let the worker skip them
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _check(self) -> None:
        _require(isinstance(self.n, int) and self.n >= 1, "n", "must be an int >= 1", self.n)
        _require(
            self.best_of is None or self.best_of >= self.n,
            "best_of",
            f"must be >= n ({self.n})",
            self.best_of,
        )
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _require(
            self.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0",
            self.repetition_penalty,
        )
        _require(self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(self.top_k >= 0, "top_k", "must be -1 (off), 0 (off) or >= 1", self.top_k)
        _require(
            self.seed is None or seed_fits(self.seed),
            "seed",
            "must fit in 64 bits",
            self.seed,
        )
        _check_range("min_p", self.min_p, 0.0, 1.0)
        self._check_lengths()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or value >= 0, name, "must be >= 0", value)
        _require(
            all(s for s in self.stop_strings), "stop", "must not contain an empty string", self.stop
        )
        _check_ids_below("allowed_token_ids", self.allowed_token_ids or [], None)
        _require(
            self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
            "allowed_token_ids",
            "must not be empty",
            self.allowed_token_ids,
        )
        _check_ids_below("logit_bias", (self.logit_bias or {}).keys(), None)
        _check_ids_below("stop_token_ids", self.stop_token_ids or [], None)

    def _check_lengths(self) -> None:
        _require(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            "must be >= 1",
            self.max_tokens,
        )
        _require(self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens)
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be <= max_tokens ({self.max_tokens})",
            self.min_tokens,
        )
        _require(
            self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1,
            "truncate_prompt_tokens",
            "must be >= 1",
            self.truncate_prompt_tokens,
        )


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return list(ids)


def _require(ok: bool, field: str, requirement: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} {requirement}, got {value!r}")


def _check_range(field: str, value: float, low: float, high: float) -> None:
    _require(low <= value <= high, field, f"must be in [{low}, {high}]", value)


def _check_ids_below(field: str, ids: Iterable[int], vocab_size: int | None) -> None:
    # vocab_size None: only check that ids are non-negative (no model at hand yet)
    for token_id in ids:
        _require(token_id >= 0, field, "must hold token ids >= 0", token_id)
        if vocab_size is not None:
            _require(
                token_id < vocab_size,
                field,
                f"must hold token ids below the vocabulary size ({vocab_size})",
                token_id,
            )
