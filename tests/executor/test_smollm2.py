"""SmolLM2-135M-Instruct (its Q4_1 GGUF) against transformers' own reading of the file:
the loaded parameters, the model's greedy tokens over a paged KV cache, and the offline
LLM's tokens and chat template.

All of them in one file, so that one pytest worker loads the GGUF through transformers
(~30 s on two cores) and runs its greedy reference (~10 s) once: with `--dist loadfile`
each test file goes to one worker, and these checks used to sit in three files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine_core import LLM, SamplingParams
from executor.loader import load_model
from tests.helpers.generate import GREEDY
from tests.helpers.tiny_models import (
    SMOLLM2_PROMPTS,
    greedy_generate,
    hf_greedy_generate,
    make_engine_config,
    smollm2_gguf_path,
)

MODEL = "tessera/smollm2-135m-instruct"  # the alias of the GGUF the loads below read
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model() -> Any:
    """transformers' model, from the GGUF with its own GGUF reader (weights and config)."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_config(hf_model: Any) -> dict[str, Any]:
    # transformers has read the GGUF's config already; reusing it saves a second parse.
    return json.loads(hf_model.config.to_json_string())


@pytest.fixture(scope="module")
def ours(hf_config: dict[str, Any]) -> torch.nn.Module:
    """Our model, from the same GGUF through executor.loader."""
    return load_model(
        make_engine_config(smollm2_gguf_path(), hf_config=hf_config), torch.device("cpu")
    )


@pytest.fixture(scope="module")
def reference(hf_model: Any) -> list[list[int]]:
    """transformers' greedy tokens for SMOLLM2_PROMPTS."""
    return hf_greedy_generate(hf_model, SMOLLM2_PROMPTS, MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    """One offline LLM on the alias for the module (the engine core in this process;
    these tests are about tokens, not processes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
        with LLM(MODEL, max_model_len=512) as engine:
            yield engine


@pytest.mark.slow
def test_smollm2_gguf_state_dict_equals_transformers(ours: torch.nn.Module, hf_model: Any) -> None:
    # transformers reads the same Q4_1 file with its own GGUF code; after our fusing
    # of q/k/v and gate/up the parameters must hold exactly its tensors.
    hf = hf_model.state_dict()
    params = dict(ours.named_parameters())
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
    fused |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    consumed: dict[str, int] = {}
    for name, want in hf.items():
        if name == "lm_head.weight":  # tied: the embedding
            assert torch.equal(params["model.embed_tokens.weight"], want)
            continue
        module, kind = name.rsplit(".", 1)
        parent, leaf = module.rsplit(".", 1)
        target = f"{parent}.{fused.get(leaf, leaf)}.{kind}"
        offset = consumed.get(target, 0)
        got = params[target][offset : offset + want.shape[0]]
        consumed[target] = offset + want.shape[0]
        assert torch.equal(got, want), name
    assert all(consumed[name] == params[name].shape[0] for name in consumed)
    assert set(consumed) | {"model.embed_tokens.weight"} == set(params)


@pytest.mark.slow
def test_smollm2_gguf_greedy_tokens_equal_transformers(
    ours: torch.nn.Module, hf_config: dict[str, Any], reference: list[list[int]]
) -> None:
    prompts = [list(p) for p in SMOLLM2_PROMPTS]
    got = greedy_generate(ours, hf_config, prompts, max_new_tokens=MAX_NEW_TOKENS)
    assert got.tokens == reference


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(llm: LLM, reference: list[list[int]]) -> None:
    # the offline LLM end to end: the alias, the engine's own config and GGUF loading,
    # scheduling and sampling
    prompts = [list(p) for p in SMOLLM2_PROMPTS]
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, **GREEDY)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == reference


def test_chat_applies_the_template(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=8, temperature=0)
    )
    assert "<|im_start|>assistant" in llm.get_tokenizer().decode(
        out[0].prompt_token_ids, skip_special_tokens=False
    )
    assert out[0].outputs[0].text
