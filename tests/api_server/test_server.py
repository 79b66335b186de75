"""`tessera serve` with SmolLM2, through the official openai client (sync and async)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api_server.serve_helpers import API_KEY, SERVED_NAMES, Server

MODEL = SERVED_NAMES[0]
PROMPT = "The capital of France is"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)


def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=300)


def greedy(client: openai.OpenAI, prompt: str = PROMPT, max_tokens: int = 12, **kw):
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw
    )


def chat_messages(text: str = "What is the capital of France?") -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def post(server: Server, path: str, body: dict | bytes | str, headers=None) -> requests.Response:
    headers = {**AUTH, **(headers or {})}
    if isinstance(body, dict):
        return requests.post(server.url + path, json=body, headers=headers, timeout=120)
    return requests.post(server.url + path, data=body, headers=headers, timeout=120)


def metric(server: Server, name: str, labels: str = "") -> float:
    """The sum of a metric's samples (those whose labels contain `labels`)."""
    text = requests.get(server.url + "/metrics", timeout=30).text
    pattern = rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$"
    values = [float(v) for tags, v in re.findall(pattern, text, re.M) if labels in tags]
    assert values or labels, f"{name} not in /metrics"
    return sum(values)


# ---- simple routes ----------------------------------------------------------------------


def test_models_lists_every_served_name(client: openai.OpenAI, server: Server):
    models = client.models.list().data
    assert [m.id for m in models] == SERVED_NAMES
    raw = requests.get(server.api_url + "/models", headers=AUTH, timeout=10).json()
    assert [m["max_model_len"] for m in raw["data"]] == [1024, 1024]


def test_health_ping_version(server: Server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.get(server.url + "/ping", timeout=10).status_code == 200
    assert requests.post(server.url + "/ping", timeout=10).status_code == 200
    assert requests.get(server.url + "/version", timeout=10).json()["version"] == "0.1.0"


def test_tokenize_detokenize_round_trip(server: Server):
    text = "Hello, world! Tokenize me."
    tokens = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 3
    assert tokens["max_model_len"] == 1024
    assert len(tokens["token_strs"]) == tokens["count"]
    back = post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text


def test_tokenize_messages_counts_the_chat_prompt(client: openai.OpenAI, server: Server):
    counted = post(server, "/tokenize", {"messages": chat_messages()}).json()["count"]
    reply = client.chat.completions.create(
        model=MODEL, messages=chat_messages(), max_tokens=1, temperature=0
    )
    assert reply.usage.prompt_tokens == counted


# ---- completions ------------------------------------------------------------------------


def test_completion_usage_and_determinism(client: openai.OpenAI, server: Server):
    first = greedy(client)
    second = greedy(client)
    assert first.id.startswith("cmpl-") and first.object == "text_completion"
    assert first.model == MODEL
    choice = first.choices[0]
    assert choice.text == second.choices[0].text and choice.text
    assert choice.finish_reason == "length"
    prompt_tokens = post(server, "/tokenize", {"prompt": PROMPT}).json()["count"]
    assert first.usage.prompt_tokens == prompt_tokens
    assert first.usage.completion_tokens == 12
    assert first.usage.total_tokens == prompt_tokens + 12


def test_second_served_name_is_accepted(client: openai.OpenAI):
    reply = client.completions.create(model=SERVED_NAMES[1], prompt=PROMPT, max_tokens=2)
    assert reply.model == SERVED_NAMES[1]


def test_token_id_prompts_and_several_prompts(client: openai.OpenAI, server: Server):
    ids = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    by_text = greedy(client, max_tokens=6).choices[0].text
    reply = client.completions.create(
        model=MODEL, prompt=[ids, PROMPT, ids], max_tokens=6, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [by_text] * 3
    assert reply.usage.prompt_tokens == 3 * len(ids)
    assert reply.usage.completion_tokens == 18


def test_stream_equals_whole_text(client: openai.OpenAI):
    whole = greedy(client, max_tokens=10).choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len(text_chunks) > 1  # streamed, not sent at the end
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 10


def test_continuous_usage_stats(client: openai.OpenAI):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(c.usage.prompt_tokens == chunks[0].usage.prompt_tokens for c in chunks)


def test_n2_returns_two_choices(client: openai.OpenAI):
    reply = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.finish_reason for c in reply.choices] == ["length", "length"]
    assert reply.usage.completion_tokens == 16
    assert reply.choices[0].text != reply.choices[1].text


def test_n2_stream_gives_each_choice_its_text(client: openai.OpenAI):
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=11
    )
    texts = ["", ""]
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=11, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]


def test_best_of_keeps_the_most_likely(client: openai.OpenAI):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, logprobs=0)
    candidates = client.completions.create(n=3, **kw).choices
    best = client.completions.create(n=1, best_of=3, **kw).choices
    assert len(best) == 1
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in candidates}
    assert best[0].text == max(scores, key=scores.get)


def test_completion_logprobs(client: openai.OpenAI):
    reply = greedy(client, max_tokens=5, logprobs=2)
    choice = choice_lp = reply.choices[0]
    lp = choice_lp.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == choice.text
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and value <= 0
        assert top[token] == value == max(top.values())  # greedy: the most likely token


def test_echo_with_logprobs(client: openai.OpenAI, server: Server):
    ids = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    plain = greedy(client, max_tokens=3).choices[0].text
    reply = greedy(client, max_tokens=3, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == PROMPT + plain
    assert len(choice.logprobs.tokens) == len(ids) + 3
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])


def test_echo_without_generation_scores_the_prompt(client: openai.OpenAI, server: Server):
    # lm-eval's loglikelihood request: echo, max_tokens 0, logprobs
    ids = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    scored = greedy(client, max_tokens=3, echo=True, logprobs=1).choices[0].logprobs
    reply = greedy(client, max_tokens=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert choice.logprobs.tokens == scored.tokens[: len(ids)]
    assert choice.logprobs.token_logprobs == scored.token_logprobs[: len(ids)]
    assert reply.usage.completion_tokens == 0
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, stream=True, temperature=0
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        greedy(client, max_tokens=0)  # without echo, 0 tokens is still refused


def test_request_field_returns_tokens_as_ids(client: openai.OpenAI, server: Server):
    extra = {"return_tokens_as_token_ids": True}
    reply = greedy(client, max_tokens=3, logprobs=1, extra_body=extra)
    assert reply.choices[0].logprobs.tokens[0].startswith("token_id:")
    chat = client.chat.completions.create(
        model=MODEL, messages=chat_messages(), max_tokens=2, logprobs=True, extra_body=extra
    )
    assert chat.choices[0].logprobs.content[0].token.startswith("token_id:")
    assert (
        not greedy(client, max_tokens=1, logprobs=1)
        .choices[0]
        .logprobs.tokens[0]
        .startswith("token_id:")
    )


def sse_events(response: requests.Response) -> list[dict]:
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_return_token_ids(server: Server):
    ids = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    body["return_token_ids"] = True
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 4
    text = post(server, "/detokenize", {"tokens": choice["token_ids"]}).json()["prompt"]
    assert text == choice["text"]
    events = sse_events(post(server, "/v1/completions", {**body, "stream": True}))
    assert [e["choices"][0].get("prompt_token_ids") for e in events][:1] == [ids]
    assert all("prompt_token_ids" not in e["choices"][0] for e in events[1:])
    assert sum((e["choices"][0]["token_ids"] for e in events), []) == choice["token_ids"]

    chat = {"model": MODEL, "messages": chat_messages(), "max_tokens": 3, "temperature": 0}
    chat["return_token_ids"] = True
    whole = post(server, "/v1/chat/completions", chat).json()
    assert len(whole["prompt_token_ids"]) > len(ids)
    assert len(whole["choices"][0]["token_ids"]) == 3
    events = sse_events(post(server, "/v1/chat/completions", {**chat, "stream": True}))
    assert events[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in e for e in events[1:])
    streamed = sum((c.get("token_ids", []) for e in events for c in e["choices"]), [])
    assert streamed == whole["choices"][0]["token_ids"]
    assert (
        "token_ids"
        not in post(server, "/v1/completions", {**body, "return_token_ids": False}).json()[
            "choices"
        ][0]
    )


def test_request_ids_from_the_body_or_the_header(server: Server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "request_id": "mine-1"}
    assert post(server, "/v1/completions", body).json()["id"] == "cmpl-mine-1"
    chat = {"model": MODEL, "messages": chat_messages(), "max_tokens": 1}
    reply = post(server, "/v1/chat/completions", chat, headers={"X-Request-Id": "hdr-2"})
    assert reply.json()["id"] == "chatcmpl-hdr-2"
    too_long = post(server, "/v1/completions", {**body, "request_id": "x" * 300})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "request_id"


def test_echo_streams_the_prompt_first(client: openai.OpenAI):
    plain = greedy(client, max_tokens=4).choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True
        )
    )
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain


def test_stop_string(client: openai.OpenAI):
    text = greedy(client, max_tokens=12).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick another stop string from {text!r}"
    expected = text[: text.index(stop)]
    reply = greedy(client, max_tokens=12, stop=[stop])
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].model_extra["stop_reason"] == stop
    kept = greedy(
        client, max_tokens=12, stop=[stop], extra_body={"include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == expected + stop
    streamed = "".join(
        c.choices[0].text
        for c in greedy(client, max_tokens=12, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == expected


def test_same_seed_same_text(client: openai.OpenAI):
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_cached_tokens_reported(client: openai.OpenAI):
    prompt = "A long shared prefix for the cache. " * 8  # several full KV blocks
    greedy(client, prompt=prompt, max_tokens=1)
    again = greedy(client, prompt=prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_cache_salt_keeps_tenants_apart(client: openai.OpenAI, server: Server):
    prompt = "Another long prefix, this one salted. " * 8

    def cached(salt: str | None) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        reply = greedy(client, prompt=prompt, max_tokens=1, extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # a's blocks are not b's
    assert cached(None) == 0  # nor the unsalted requests'
    assert cached("tenant-a") >= 16  # a's own blocks still hit
    chat = {"model": MODEL, "messages": chat_messages(), "max_tokens": 1, "cache_salt": ""}
    response = post(server, "/v1/chat/completions", chat)
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


# ---- chat -------------------------------------------------------------------------------


def test_chat_whole_and_stream_agree(client: openai.OpenAI):
    whole = client.chat.completions.create(
        model=MODEL, messages=chat_messages(), max_tokens=10, temperature=0
    )
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    assert whole.usage.completion_tokens <= 10
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=chat_messages(),
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_text_parts_and_max_completion_tokens(client: openai.OpenAI):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    reply = client.chat.completions.create(
        model=MODEL, messages=parts, max_completion_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_chat_logprobs(client: openai.OpenAI):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=chat_messages(),
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.bytes == list(entry.token.encode())


def test_chat_n2_seeded(client: openai.OpenAI):
    kw = dict(model=MODEL, messages=chat_messages(), max_tokens=5, n=2, temperature=1.0, seed=5)
    first = client.chat.completions.create(**kw)
    second = client.chat.completions.create(**kw)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len(first.choices) == 2


def test_continue_final_message(client: openai.OpenAI, server: Server):
    messages = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "The color is"},
    ]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 3,
        "temperature": 0,
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_async_client_completion_and_chat(server: Server):
    async def run() -> tuple[str, str, str]:
        aclient = async_client(server)
        whole = await aclient.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0
        )
        stream = await aclient.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].text async for c in stream])
        chat = await aclient.chat.completions.create(
            model=MODEL, messages=chat_messages(), max_tokens=4, temperature=0
        )
        await aclient.close()
        return whole.choices[0].text, streamed, chat.choices[0].message.content

    whole, streamed, chat = asyncio.run(run())
    assert whole == streamed and chat


# ---- errors -----------------------------------------------------------------------------

ERROR_CASES = [
    # (path, body, status, type, param)
    ("/v1/completions", b"{not json", 400, "BadRequestError", None),
    ("/v1/completions", b"[1, 2]", 400, "BadRequestError", None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "foo": 1}, 400, "BadRequestError", "foo"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "BadRequestError", "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "3"}, 400, "BadRequestError", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2000}, 400, "BadRequestError", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 1024}, 400, "BadRequestError", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400, "BadRequestError", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "BadRequestError", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 2}, 400, "BadRequestError", "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "BadRequestError", "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "BadRequestError", "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "BadRequestError", "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2, "best_of": 1}, 400, "BadRequestError", "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2, "stream": True}, 400, "BadRequestError", "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "BadRequestError", "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}, 400, "BadRequestError", "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "BadRequestError", "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 129}, 400, "BadRequestError", "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 1000}, 400, "BadRequestError", "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**64}, 400, "BadRequestError", "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "priority": 1}, 400, "BadRequestError", "priority"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "NotFoundError", "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "BadRequestError", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "BadRequestError", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "BadRequestError", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": chat_messages(), "tools": [{"type": "function"}]}, 400, "BadRequestError", "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": chat_messages(), "top_logprobs": 2}, 400, "BadRequestError", "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "BadRequestError", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": chat_messages(), "max_tokens": 5000}, 400, "BadRequestError", "max_tokens"),
    ("/v1/chat/completions", {"model": "nope", "messages": chat_messages()}, 404, "NotFoundError", "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": chat_messages(), "chat_template_kwargs": {"tokenize": True}}, 400, "BadRequestError", "chat_template_kwargs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "continue_final_message": True, "add_generation_prompt": False}, 400, "BadRequestError", "continue_final_message"),
    ("/tokenize", {"prompt": "x", "messages": chat_messages()}, 400, "BadRequestError", "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "BadRequestError", "tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "kind", "param"), ERROR_CASES)
def test_error_responses(server: Server, path, body, status, kind, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status
    assert error["param"] == param and error["message"]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2)
    ),
    max_leaves=6,
)
FIELDS = [
    "prompt",
    "messages",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "top_logprobs",
    "logit_bias",
    "temperature",
    "seed",
    "best_of",
    "min_tokens",
    "top_k",
]


@pytest.mark.slow
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]),
    body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5),
)
def test_random_bodies_never_give_a_500(server: Server, path: str, body: dict):
    if path != "/tokenize":
        body = {**body, "max_tokens": 2}  # keep the valid ones short
    response = post(server, path, body)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["type"] == "BadRequestError"


def test_openai_client_raises_the_matching_errors(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5000)


def test_api_key_guards_only_v1(server: Server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    missing = requests.post(server.api_url + "/completions", json=body, timeout=30)
    wrong = requests.post(
        server.api_url + "/completions",
        json=body,
        headers={"Authorization": "Bearer wrong"},
        timeout=30,
    )
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "AuthenticationError"
    assert requests.get(server.api_url + "/models", timeout=30).status_code == 401
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert requests.get(server.url + "/metrics", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.api_url, api_key="wrong", max_retries=0).models.list()


def test_streams_declare_utf8(server: Server):
    body = {"model": MODEL, "prompt": "Écrivez", "max_tokens": 2, "stream": True}
    response = post(server, "/v1/completions", body)
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.text.endswith("data: [DONE]\n\n")


def test_retrieve_a_model(client: openai.OpenAI):
    for name in SERVED_NAMES:
        assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_undecodable_bodies_and_keys_are_not_500s(server: Server):
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = post(server, "/v1/completions", b"not gzip at all", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"
    # a key of bytes that are not UTF-8 is a wrong key
    response = requests.get(
        server.api_url + "/models", headers={"Authorization": "Bearer sekr\xefit"}, timeout=30
    )
    assert response.status_code == 401


def test_unknown_route_and_method(server: Server):
    response = requests.get(server.url + "/v1/nothing", headers=AUTH, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFoundError"
    response = requests.delete(server.api_url + "/models", headers=AUTH, timeout=30)
    assert response.status_code == 405 and response.json()["error"]["code"] == 405


def test_oversized_body_is_refused(server: Server):
    # The declared length alone decides: the server answers before reading the body.
    headers = {**AUTH, "Content-Length": str(64 * 1024 * 1024), "Content-Type": "application/json"}
    with requests.Session() as session:
        request = requests.Request("POST", server.api_url + "/completions", headers=headers)
        prepared = session.prepare_request(request)
        prepared.body = b"{}"  # far shorter than declared: the server must not wait for it
        prepared.headers["Content-Length"] = str(64 * 1024 * 1024)
        response = session.send(prepared, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "RequestEntityTooLarge"


def test_cors_headers(server: Server):
    headers = {"Origin": "http://example.com"}
    response = requests.get(server.url + "/health", headers=headers, timeout=30)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    preflight = requests.options(
        server.api_url + "/chat/completions",
        headers={**headers, "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


# ---- load, disconnects, metrics ---------------------------------------------------------


@pytest.mark.slow
def test_100_concurrent_streams_and_bad_input_alongside(server: Server, client: openai.OpenAI):
    reference = greedy(client, max_tokens=4).choices[0].text

    async def one(aclient: openai.AsyncOpenAI) -> tuple[str, int]:
        stream = await aclient.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    async def run() -> list[tuple[str, int]]:
        aclient = async_client(server)
        results = await asyncio.gather(*(one(aclient) for _ in range(100)))
        await aclient.close()
        return results

    bad_statuses: list[int] = []

    def send_bad_input() -> None:
        for body in (b"{oops", b'{"prompt": [1, "a"]}', b'{"prompt": "x", "n": -1}') * 5:
            bad_statuses.append(post(server, "/v1/completions", body).status_code)

    spoiler = threading.Thread(target=send_bad_input)
    spoiler.start()
    results = asyncio.run(run())
    spoiler.join()
    assert results == [(reference, 4)] * 100
    assert bad_statuses == [400] * 15


@pytest.mark.slow
def test_disconnect_mid_stream_aborts_the_request(server: Server):
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    abort = 'finished_reason="abort"'
    aborts_before = metric(server, "tessera:request_success_total", abort)
    with requests.post(
        server.api_url + "/completions", json=body, headers=AUTH, stream=True, timeout=60
    ) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events (and blank separators)
        assert any(line.startswith(b"data: ") for line in got)
        assert metric(server, "tessera:num_requests_running") == 1
    # the connection is closed: the server must abort the request in the engine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(server, "tessera:num_requests_running") != 0:
        time.sleep(0.2)
    assert metric(server, "tessera:num_requests_running") == 0
    assert metric(server, "tessera:num_requests_waiting") == 0
    assert metric(server, "tessera:request_success_total", abort) == aborts_before + 1


METRIC_NAMES = [
    "tessera:num_requests_running",
    "tessera:num_requests_waiting",
    "tessera:kv_cache_usage_perc",
    "tessera:prefix_cache_queries_total",
    "tessera:prefix_cache_hits_total",
    "tessera:prompt_tokens_total",
    "tessera:generation_tokens_total",
    "tessera:request_success_total",
    "tessera:time_to_first_token_seconds_count",
    "tessera:inter_token_latency_seconds_count",
    "tessera:request_time_per_output_token_seconds_count",
    "tessera:e2e_request_latency_seconds_count",
    "tessera:request_queue_time_seconds_count",
]


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, server: Server):
    before = {name: metric(server, name) for name in METRIC_NAMES[5:]}
    reply = greedy(client, max_tokens=5)  # not streamed: timed from the engine's outputs
    after = {name: metric(server, name) for name in METRIC_NAMES}
    growth = {name: after[name] - before[name] for name in before}
    assert growth == {
        "tessera:prompt_tokens_total": reply.usage.prompt_tokens,
        "tessera:generation_tokens_total": 5,
        "tessera:request_success_total": 1,
        "tessera:time_to_first_token_seconds_count": 1,
        "tessera:inter_token_latency_seconds_count": 4,
        "tessera:request_time_per_output_token_seconds_count": 1,
        "tessera:e2e_request_latency_seconds_count": 1,
        "tessera:request_queue_time_seconds_count": 1,
    }
    assert after["tessera:num_requests_running"] == after["tessera:num_requests_waiting"] == 0
    text = requests.get(server.url + "/metrics", timeout=30).text
    assert f'tessera:request_success_total{{finished_reason="length",model_name="{MODEL}"}}' in text


@pytest.mark.slow
def test_bench_serve_against_the_server(server: Server, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "serve.py"), "--base-url", server.url]
    cmd += ["--api-key", API_KEY, "--num-prompts", "8", "--random-input-len", "16"]
    cmd += ["--random-output-len", "4", "--random-range-ratio", "0.5", "--random-prefix-len", "4"]
    cmd += ["--ignore-eos", "--request-rate", "50", "--burstiness", "0.5", "--max-concurrency", "4"]
    cmd += ["--output-json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Serving Benchmark Result" in result.stdout
    summary = json.loads(out.read_text())
    assert (summary["completed"], summary["failed"]) == (8, 0)
    assert 8 * 2 <= summary["total_output_tokens"] <= 8 * 6  # lengths in [2, 6]
    assert summary["total_input_tokens"] >= 8 * (4 + 8)
    assert summary["mean_ttft_ms"] > 0 and summary["p99_e2el_ms"] >= summary["median_e2el_ms"]


def test_no_profile_endpoints_without_the_profiler_folder(server):
    # TESSERA_TORCH_PROFILER_DIR is not set for this server (see test_profile_endpoints)
    assert requests.post(server.url + "/start_profile", timeout=10).status_code == 404
