"""Client-side input processing: prompts to token ids, SamplingParams to core requests.

Shared by the offline `LLM` and the API server. A request with n > 1 becomes n child
requests in the core (`{id}-{i}`); with prefix caching they share the prompt blocks.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Sequence
from typing import Any

from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams
from executor.config import EngineConfig

PromptType = str | list[int] | dict[str, Any]


def child_request_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.generation_config = config.model.generation_config
        self.vocab_size = int(config.model.hf_config.get("vocab_size", 0)) or None
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        tok = getattr(self.tokenizer, "eos_token_id", None)
        if tok is not None:
            ids.append(tok)
        gen = self.generation_config.get("eos_token_id")
        ids += gen if isinstance(gen, list) else ([gen] if gen is not None else [])
        if not ids and self.config.model.hf_config.get("eos_token_id") is not None:
            eos = self.config.model.hf_config["eos_token_id"]
            ids += eos if isinstance(eos, list) else [eos]
        return list(dict.fromkeys(ids))

    # ---- prompts ------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "text prompts need a tokenizer (the engine runs with --skip-tokenizer-init)"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) or hasattr(prompt, "__array__"):  # numpy arrays too
            return None, _token_ids(prompt)
        raise TypeError(
            f"a prompt is a string, a list of token ids or a dict, not {type(prompt).__name__}"
        )

    @staticmethod
    def cache_salt(prompt: PromptType) -> str | None:
        """A dict prompt's cache_salt (vLLM's key): a non-empty string, or None."""
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and not (isinstance(salt, str) and salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
        return salt

    def check_token_ids(self, ids: list[int]) -> None:
        """Refuse a prompt the engine could never run (the core checks again)."""
        if not ids:
            raise ValueError("the prompt is empty")
        max_len = self.config.model.max_model_len
        if len(ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, the maximum model length is {max_len}"
            )
        if self.vocab_size and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")

    # ---- sampling parameters -------------------------------------------------------
    def resolve_params(
        self, params: SamplingParams | None, num_prompt_tokens: int
    ) -> SamplingParams:
        """Apply the model's generation defaults, validate, fill max_tokens."""
        if params is None:
            params = SamplingParams.from_optional()
        params = params.with_generation_defaults(self.generation_config)
        params.validate(max_logprobs=self.config.model.max_logprobs, vocab_size=self.vocab_size)
        return params

    def _bad_words_ids(self, params: SamplingParams) -> list[list[int]] | None:
        if not params.bad_words:
            return None
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer")
        out = []
        for word in params.bad_words:
            # a word may appear at the start of the text or after a space: ban both forms
            for text in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def make_requests(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> list[EngineCoreRequest]:
        max_model_len = self.config.model.max_model_len
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(max_model_len - len(prompt_ids), 1)
        options = params.to_options(self.eos_ids, self._bad_words_ids(params))
        arrival = time.time() if arrival_time is None else arrival_time
        requests = []
        for i, rid in enumerate(child_request_ids(request_id, params.n)):
            opts = options
            if params.n > 1 and options.seed is not None:
                # distinct but reproducible samples for each child
                opts = _replace_seed(options, options.seed + i)
            requests.append(
                EngineCoreRequest(
                    rid,
                    prompt_ids,
                    opts,
                    max_tokens,
                    self.eos_ids,
                    params.ignore_eos,
                    arrival,
                    priority,
                    cache_salt,
                )
            )
        return requests


def _token_ids(values: Any) -> list[int]:
    """Token ids as Python ints (numpy integers too, through __index__); bools, floats
    and strings are refused: they would reach the engine's messages and fail there."""
    if isinstance(values, str | bytes | dict) or not hasattr(values, "__iter__"):
        raise TypeError(f"token ids must be a sequence of integers, not {type(values).__name__}")
    # The common forms at C speed: one check per id in Python took 0.2 s for W2's 143K
    # prompt ids on a slow CPU, before the engine got its first request.
    if isinstance(values, list) and set(map(type, values)) <= {int}:  # bool is not int here
        return list(values)
    kind = getattr(getattr(values, "dtype", None), "kind", None)
    if getattr(values, "ndim", None) == 1 and kind in ("i", "u"):
        return values.tolist()  # a numpy integer array
    return [_token_id(value) for value in values]


def _token_id(value: Any) -> int:
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise TypeError(f"token ids must be integers, got {value!r}")


def _replace_seed(options, seed: int):
    import msgspec

    return msgspec.structs.replace(options, seed=seed)
