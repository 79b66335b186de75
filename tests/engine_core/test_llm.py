"""The offline LLM end to end on the CPU: greedy tokens equal transformers, and
prefix caching, chunked prefill, preemption and batching leave them unchanged.

(SmolLM2 against transformers, and the chat template, are in
tests/executor/test_smollm2.py, with the other SmolLM2 checks: one transformers load.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine_core import LLM, SamplingParams
from engine_core.config import ADMISSION_HORIZON_ENV
from tests.helpers.generate import GREEDY, random_prompts, token_ids
from tests.helpers.reference import hf_greedy, load_hf_model
from tests.helpers.tiny_models import make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt2"]


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    # The engine core in this process: these tests are about tokens, not processes.
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path


def test_greedy_matches_transformers(tiny):
    arch, path = tiny
    prompts = random_prompts(4, (3, 40), seed=1)
    llm = LLM(str(path), max_model_len=256, seed=0, enforce_eager=True)
    got = token_ids(llm.generate(prompts, SamplingParams(max_tokens=16, **GREEDY)))
    want = hf_greedy(load_hf_model(path), prompts, 16)
    assert got == want, arch


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("llama-inv"), "llama"))


# prompts of 30-140 tokens: several blocks of 8, one or two of 128
BLOCK_PROMPTS = random_prompts(3, (30, 140), seed=5)


@pytest.fixture(scope="module")
def llama_reference(llama) -> list[list[int]]:
    """transformers' greedy tokens of the llama model for BLOCK_PROMPTS, computed once."""
    return hf_greedy(load_hf_model(llama), BLOCK_PROMPTS, 12)


@pytest.mark.parametrize("block_size", [8, 64, 128])
def test_block_sizes_give_the_tokens_of_transformers(block_size, llama, llama_reference):
    llm = LLM(llama, max_model_len=256, block_size=block_size, enforce_eager=True)
    got = token_ids(llm.generate(BLOCK_PROMPTS, SamplingParams(max_tokens=12, **GREEDY)))
    llm.shutdown()
    assert got == llama_reference


@pytest.fixture(scope="module")
def shared_llm(llama) -> Iterator[LLM]:
    """One LLM of the llama model (default engine arguments) for the tests below that
    only need a working engine: starting one costs seconds (its worker process loads
    torch). Each test leaves it idle; none depends on what another ran on it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")  # as _in_process, for the module
        with LLM(llama, max_model_len=256) as llm:
            yield llm


def _run(path: str, prompts, max_tokens=24, **engine_args) -> list[list[int]]:
    llm = LLM(path, max_model_len=256, **engine_args)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **GREEDY))
    llm.shutdown()
    return token_ids(outs)


def test_invariance_prefix_cache_chunking_preemption_batching(llama, shared_llm, monkeypatch):
    shared = random_prompts(1, (40, 40), seed=7)[0]
    prompts = [shared + p for p in random_prompts(8, (1, 30), seed=3)]
    prompts += random_prompts(8, (5, 60), seed=4)
    params = SamplingParams(max_tokens=24, **GREEDY)
    # the reference: the batch without a prefix cache; batching: on the same engine, each
    # of four prompts alone gets its tokens of the batch
    llm = LLM(llama, max_model_len=256, enable_prefix_caching=False)
    base = token_ids(llm.generate(prompts, params))
    alone = [token_ids(llm.generate([p], params))[0] for p in prompts[:4]]
    llm.shutdown()
    assert alone == base[:4]
    # the prefix cache on (the default engine); the first 8 prompts share 40 tokens
    assert token_ids(shared_llm.generate(prompts, params)) == base
    # a token budget of 16: every prompt longer than that is chunked
    assert _run(llama, prompts, max_num_batched_tokens=16, max_num_seqs=4) == base
    # 40 blocks of 16 tokens for 16 requests of up to ~100 tokens: the admission
    # headroom holds prompts back; without it they preempt each other
    assert _run(llama, prompts, num_gpu_blocks_override=40, block_size=16) == base
    monkeypatch.setenv(ADMISSION_HORIZON_ENV, "0")
    assert _run(llama, prompts, num_gpu_blocks_override=40, block_size=16) == base


def test_prefix_cache_hits_are_reported(shared_llm):
    llm = shared_llm  # blocks of 16 tokens (the default)
    assert llm.config.cache.block_size == 16
    assert llm.reset_prefix_cache()  # whatever the other tests left cached
    prompt = random_prompts(1, (50, 50), seed=9)[0]
    params = SamplingParams(max_tokens=4, **GREEDY)
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48  # three full blocks of 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.reset_prefix_cache()
    assert llm.generate([prompt], params)[0].num_cached_tokens == 0
    # vLLM's cache_salt key of a prompt dict: blocks are shared only under one salt
    salted = {"prompt_token_ids": prompt, "cache_salt": "tenant"}
    assert llm.generate([salted], params)[0].num_cached_tokens == 0
    again = llm.generate([salted], params)[0]
    assert again.num_cached_tokens == 48
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate([{**salted, "cache_salt": 5}], params)


def test_sampling_features_end_to_end(shared_llm):
    llm = shared_llm
    prompt = random_prompts(1, (10, 10), seed=5)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=42, n=3, ignore_eos=True)
    a = llm.generate([prompt], seeded)[0]
    b = llm.generate([prompt, prompt[:5]], [seeded, seeded])[0]  # other neighbours
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # children differ
    lp = llm.generate(
        [prompt], SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1, **GREEDY)
    )[0]
    assert len(lp.outputs[0].logprobs) == 3
    for pos, tok in zip(lp.outputs[0].logprobs, lp.outputs[0].token_ids, strict=True):
        assert tok in pos and pos[tok].rank == 1  # greedy picks the top token
        assert len(pos) == 2
    assert lp.prompt_logprobs[0] is None and len(lp.prompt_logprobs) == len(prompt)


def test_stop_strings_and_max_tokens(shared_llm):
    llm = shared_llm
    prompt = random_prompts(1, (8, 8), seed=11)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0]
    assert len(full.token_ids) == 20 and full.finish_reason == "length"
    stop = full.text[len(full.text) // 2 :][:3]
    cut = llm.generate([prompt], SamplingParams(max_tokens=20, stop=[stop], **GREEDY))
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]


def test_bad_requests_fail_alone(llama):
    llm = LLM(llama, max_model_len=64, max_logprobs=5)
    with pytest.raises(ValueError, match="maximum model length"):
        llm.generate([list(range(10, 80))], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([[11, 12]], SamplingParams(max_tokens=4, logprobs=6))
    ok = llm.generate([[11, 12, 13]], SamplingParams(max_tokens=4, **GREEDY))
    assert len(ok[0].outputs[0].token_ids) == 4


def test_fp8_kv_cache_keeps_peaked_greedy_tokens(llama, shared_llm):
    # e4m3 keeps ~2 significant digits, a lossy cache rather than a rounding
    # difference: with the tiny model's peaked logits the first tokens survive, and
    # the error grows with the length (seen: the 8th token of one prompt flips).
    # The cache really is fp8 (checked through the worker).
    prompts = random_prompts(3, (5, 30), seed=21)
    base = token_ids(shared_llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY)))
    llm = LLM(llama, max_model_len=256, kv_cache_dtype="fp8")
    dtype = llm.collective_rpc("kv_cache_dtype_name")[0]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
    llm.shutdown()
    assert dtype == "torch.float8_e4m3fn"
    assert [t[:4] for t in token_ids(outs)] == [t[:4] for t in base]


# ---- bad input and interruptions leave the LLM usable ------------------------------------


@pytest.mark.parametrize(
    "prompt, params",
    [
        ({"prompt_token_ids": [True, 5]}, {}),
        ({"prompt_token_ids": [1.5]}, {}),
        ({"prompt_token_ids": "abc"}, {}),
        ({"prompt_token_ids": [5, 10**9]}, {}),  # past the vocabulary
        ([-1, 5], {}),
        ({"text": "no prompt key"}, {}),
        ([1, 2, 3], {"seed": 2**70}),
    ],
)
def test_bad_prompts_raise_and_send_nothing(shared_llm, prompt, params):
    llm = shared_llm
    good = [5, 6, 7]
    with pytest.raises((TypeError, ValueError)):
        llm.generate([good, prompt], SamplingParams(max_tokens=2, **params), use_tqdm=False)
    assert not llm.outputs.has_unfinished() and not llm.engine.core.has_work()
    assert len(llm.generate([good], SamplingParams(max_tokens=2), use_tqdm=False)) == 1
    with pytest.raises((TypeError, ValueError)):
        llm.generate([good, good], SamplingParams(max_tokens=2), priority=[0])
    with pytest.raises(TypeError):
        llm.generate([good], SamplingParams(max_tokens=2), priority=["x"])
    assert not llm.outputs.has_unfinished() and not llm.engine.core.has_work()


def test_numpy_token_ids_are_token_ids(shared_llm):
    np = pytest.importorskip("numpy")
    llm = shared_llm
    params = SamplingParams(max_tokens=4, **GREEDY)
    ids = [11, 12, 13, 14]
    want = token_ids(llm.generate([ids], params))
    got = llm.generate([{"prompt_token_ids": np.array(ids)}, np.array(ids, dtype=np.int32)], params)
    assert token_ids(got) == want * 2


def test_an_interrupted_generate_aborts_its_requests(shared_llm, monkeypatch):
    llm = shared_llm
    steps = llm.engine.get_outputs

    def interrupted():
        steps()
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "get_outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7]] * 3, SamplingParams(max_tokens=200, **GREEDY), use_tqdm=False)
    monkeypatch.undo()
    # the 200-token requests are gone: the next call runs its own request only
    assert not llm.outputs.has_unfinished()
    out = llm.generate([[8, 9]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1 and not llm.engine.core.has_work()


@pytest.mark.slow
def test_bad_token_ids_do_not_wedge_the_engine_process(llama, monkeypatch):
    # the engine core in its own process: a bad id used to be dropped there as a
    # malformed frame, and generate waited for it forever
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "1")
    with LLM(llama, max_model_len=256) as llm:
        with pytest.raises(TypeError):
            llm.generate([{"prompt_token_ids": [True, 5]}], SamplingParams(max_tokens=2))
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
