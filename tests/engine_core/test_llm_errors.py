"""The offline API's answers to misuse: a clear exception naming what is wrong, never an
AttributeError from deep inside."""

from __future__ import annotations

import pytest

from engine_core import LLM, SamplingParams
from engine_core.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("in_process")

# The template of most chat models joins strings: a missing content is an error there.
TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
        engine = LLM(str(tiny_llama), max_model_len=128, distributed_executor_backend="uni")
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("prompts", [5, None, 2.5])
def test_prompts_of_the_wrong_type(llm, prompts) -> None:
    with pytest.raises(TypeError, match="prompts are a string, a list of token ids"):
        llm.generate(prompts)


@pytest.mark.parametrize("params", [{"max_tokens": 3}, "greedy", [{"max_tokens": 3}]])
def test_sampling_params_of_the_wrong_type(llm, params) -> None:
    with pytest.raises(TypeError, match="sampling_params is a SamplingParams"):
        llm.generate([[5, 6, 7]], params)


def test_the_engine_still_works_after_refusals(llm) -> None:
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user"}], "the chat template cannot render this conversation"),
        ([{"content": "hi"}], "a chat message is a dict with a 'role' string"),
        (["hi"], "a chat message is a dict with a 'role' string"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text part needs a 'text' string"),
    ],
)
def test_bad_chat_messages(tiny_llama, messages, message) -> None:
    tokenizer = Tokenizer.load(str(tiny_llama))
    with pytest.raises(ValueError, match=message):
        tokenizer.apply_chat_template(messages, chat_template=TEMPLATE)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], TEMPLATE, False)


def test_generate_after_shutdown_says_so(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), max_model_len=128, distributed_executor_backend="uni")
    llm.shutdown()
    with pytest.raises(RuntimeError, match="has been shut down"):
        llm.generate([[5, 6, 7]])
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        llm.nothing  # noqa: B018
    llm.shutdown()  # a second shutdown is harmless
