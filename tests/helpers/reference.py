"""Greedy reference tokens from Hugging Face transformers, in float32.

A plain loop over the KV-cached forward instead of `generate()`, so that EOS neither
stops nor is masked: the engine runs with ignore_eos for these comparisons.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model(ids, use_cache=True)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        results.append(tokens)
    return results
