"""Request parsing: every bad body is an APIError (400) naming the field, never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api_server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    decode_json,
    parse_request,
)


def parse_error(body: dict, schema=CompletionRequest) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(body, schema)
    assert info.value.status == 400
    return info.value


def test_null_means_unset():
    req = parse_request({"prompt": "x", "max_tokens": None, "n": None}, CompletionRequest)
    assert (req.max_tokens, req.n, req.stream) == (16, 1, False)


def test_fields_and_nested_fields_are_typed():
    req = parse_request(
        {"prompt": [1, 2], "stop": "x", "stream": True, "stream_options": {"include_usage": True}},
        CompletionRequest,
    )
    assert req.stream_options is not None and req.stream_options.include_usage
    assert req.stop == "x"
    error = parse_error({"prompt": "x", "stream_options": {"include_usage": "yes"}})
    assert error.param == "stream_options"
    assert "stream_options.include_usage" in error.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "logit_bias": {"5": "a"}}, "logit_bias"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
    ],
)
def test_bad_fields_name_the_param(body, param):
    assert parse_error(body).param == param


def test_unsupported_fields_pass_with_their_neutral_value():
    body = {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none", "tools": []}
    req = parse_request(body, ChatCompletionRequest)
    assert req.messages[0].content == "hi"
    error = parse_error({**body, "response_format": {"type": "json_object"}}, ChatCompletionRequest)
    assert error.param == "response_format" and "structured output" in error.message


@pytest.mark.parametrize("schema", [CompletionRequest, ChatCompletionRequest])
def test_beam_search_fields_pass_only_when_neutral(schema):
    body = {"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}
    body = {k: v for k, v in body.items() if k in schema.__struct_fields__}
    parse_request({**body, "use_beam_search": False, "length_penalty": 1.0}, schema)
    assert "beam search" in parse_error({**body, "use_beam_search": True}, schema).message
    assert parse_error({**body, "length_penalty": 0.5}, schema).param == "length_penalty"


def test_messages_are_checked():
    error = parse_error({"messages": [{"role": "user", "content": 5}]}, ChatCompletionRequest)
    assert error.param == "messages"
    error = parse_error({"messages": [{"content": "hi"}]}, ChatCompletionRequest)
    assert error.param == "messages"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"3", b'"text"', b"\xff\xfe"])
def test_bodies_that_are_not_objects(raw):
    with pytest.raises(APIError) as info:
        decode_json(raw)
    assert info.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["prompt", "max_tokens", "n", "stop", "stream_options", "logit_bias", "messages",
             "temperature", "echo", "seed", "model", "extra", "logprobs", "tools"]
        ),
        json_values,
        max_size=5,
    )
)  # fmt: skip
def test_any_json_object_parses_or_is_a_400(body):
    for schema in (CompletionRequest, ChatCompletionRequest):
        try:
            parse_request(body, schema)
        except APIError as error:
            assert error.status == 400 and error.message


@pytest.mark.parametrize("depth", [33, 400, 1000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth):
    # orjson reads up to 1,024 levels; the field check must not recurse through them
    body = decode_json(b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}")
    error = parse_error(body)
    assert error.param == "prompt" and "nested deeper than 32 levels" in error.message


def test_wide_integers_are_refused_at_any_depth():
    error = parse_error({"prompt": [[1, 2], [3, 2**63]]})
    assert error.param == "prompt" and "64-bit" in error.message
    error = parse_error(
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2**64 - 1}},
        ChatCompletionRequest,
    )
    assert error.param == "logit_bias"
