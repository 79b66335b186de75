"""What the end-to-end tests share: random prompts, greedy parameters, the tokens out."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from engine_core import SamplingParams

# Greedy, and never stopped early by a random model's EOS: the token counts are known.
GREEDY: dict[str, Any] = dict(temperature=0.0, ignore_eos=True)


def random_prompts(n: int, lengths: tuple[int, int] = (3, 30), seed: int = 0) -> list[list[int]]:
    """n prompts of random ids in 10..5000 (in every test vocabulary, past the special
    tokens), each of a random length in `lengths`; the same seed draws the same ones."""
    rng = random.Random(seed)
    return [[rng.randint(10, 5000) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def token_ids(outputs: Iterable[Any]) -> list[list[int]]:
    """The first completion's token ids of each RequestOutput."""
    return [list(o.outputs[0].token_ids) for o in outputs]


def greedy_tokens(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """`llm`'s greedy tokens for each prompt, max_tokens of them."""
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    return token_ids(llm.generate(prompts, params, use_tqdm=False))
