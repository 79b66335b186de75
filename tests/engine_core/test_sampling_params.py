"""SamplingParams: defaults, normalisation, validation, generation defaults, wire form."""

from __future__ import annotations

import msgspec
import pytest

from engine_core.sampling_params import RequestOutputKind, SamplingParams
from executor.messages import SamplingOptions

GEN_CFG = {
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_new_tokens": 100,
    "do_sample": True,  # not a sampling field: ignored
}


def roundtrip(value: msgspec.Struct, kind: type) -> object:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=kind)


# ---- defaults and normalisation ----------------------------------------------------------


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop is None and p.stop_token_ids is None and p.seed is None
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert p.output_kind == RequestOutputKind.CUMULATIVE
    assert p.unset_fields == frozenset() and not p.is_greedy


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


def test_seed_minus_one_means_no_seed():
    assert SamplingParams(seed=-1).seed is None


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_greedy_resets_the_filters():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=4, min_p=0.2)
    assert p.is_greedy and (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy


def test_output_text_buffer_length_holds_back_stop_strings():
    assert SamplingParams(stop=["ab", "wxyz"]).output_text_buffer_length == 3
    assert (
        SamplingParams(stop=["ab"], include_stop_str_in_output=True).output_text_buffer_length == 0
    )
    assert SamplingParams().output_text_buffer_length == 0


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias"),
        ({"stop_token_ids": [-5]}, "stop_token_ids"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=2.0, frequency_penalty=-2.0)
    SamplingParams(temperature=0.0, top_k=-1, min_tokens=16, max_tokens=16)
    SamplingParams(max_tokens=None, min_tokens=1000, logprobs=0, n=2, best_of=2)


def test_decoding_a_bad_value_fails():
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        msgspec.json.decode(b'{"top_p": 0}', type=SamplingParams)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_validate_caps_logprobs(field):
    SamplingParams(**{field: 5}).validate(max_logprobs=5)
    with pytest.raises(ValueError, match=f"^{field} must be <= max_logprobs \\(5\\)"):
        SamplingParams(**{field: 6}).validate(max_logprobs=5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"allowed_token_ids": [1, 10]}, "allowed_token_ids"),
        ({"logit_bias": {10: 1.0}}, "logit_bias"),
        ({"stop_token_ids": [10]}, "stop_token_ids"),
    ],
)
def test_validate_checks_token_ids_against_the_vocabulary(kwargs, field):
    params = SamplingParams(**kwargs)
    params.validate(vocab_size=11)
    with pytest.raises(ValueError, match=f"^{field} .*vocabulary size \\(10\\)"):
        params.validate(vocab_size=10)


# ---- generation-config defaults ----------------------------------------------------------


def test_generation_config_fills_only_unset_fields():
    # temperature set to its default value still counts as set
    params = SamplingParams.from_optional(temperature=1.0, top_k=None, max_tokens=50, seed=3)
    assert params.unset_fields == {"top_p", "top_k", "min_p", "repetition_penalty"}
    filled = params.with_generation_defaults(GEN_CFG)
    assert filled.temperature == 1.0 and filled.max_tokens == 50 and filled.seed == 3
    assert (filled.top_p, filled.top_k, filled.min_p) == (0.9, 20, 0.05)
    assert filled.repetition_penalty == 1.1
    assert filled.unset_fields == frozenset()


def test_generation_config_fills_everything_when_nothing_is_set():
    filled = SamplingParams.from_optional().with_generation_defaults(GEN_CFG)
    assert (filled.temperature, filled.top_p, filled.top_k, filled.min_p) == (0.6, 0.9, 20, 0.05)
    assert (filled.repetition_penalty, filled.max_tokens) == (1.1, 100)


def test_unset_fields_keep_vllm_defaults_without_a_generation_config():
    params = SamplingParams.from_optional(temperature=None, top_p=None)
    assert params == SamplingParams(unset_fields=params.unset_fields)
    assert params.with_generation_defaults({}) == SamplingParams()


def test_max_new_tokens_caps_an_explicit_max_tokens():
    assert SamplingParams(max_tokens=500).with_generation_defaults(GEN_CFG).max_tokens == 100
    assert SamplingParams(max_tokens=None).with_generation_defaults(GEN_CFG).max_tokens == 100
    assert SamplingParams(max_tokens=10).with_generation_defaults(GEN_CFG).max_tokens == 10


def test_directly_built_params_count_every_field_as_set():
    filled = SamplingParams(top_k=5).with_generation_defaults(GEN_CFG)
    assert (filled.temperature, filled.top_p, filled.top_k) == (1.0, 1.0, 5)


def test_an_explicit_greedy_request_stays_greedy():
    filled = SamplingParams.from_optional(temperature=0).with_generation_defaults(GEN_CFG)
    assert filled.is_greedy and (filled.top_p, filled.top_k, filled.min_p) == (1.0, 0, 0.0)


def test_unset_fields_survive_the_wire():
    params = SamplingParams.from_optional(temperature=0.3)
    assert roundtrip(params, SamplingParams) == params
    assert msgspec.json.decode(msgspec.json.encode(params), type=SamplingParams) == params


# ---- worker options -------------------------------------------------------------------------


def test_all_stop_token_ids_adds_eos_unless_ignored():
    p = SamplingParams(stop_token_ids=[7, 2, 7])
    assert p.all_stop_token_ids(2) == [7, 2]
    assert p.all_stop_token_ids([9, 10]) == [7, 2, 9, 10]
    assert p.all_stop_token_ids(None) == [7, 2]
    assert SamplingParams(ignore_eos=True).all_stop_token_ids(2) == []


def test_to_options_carries_what_the_sampler_needs():
    params = SamplingParams(
        temperature=0.7,
        top_p=0.8,
        top_k=-1,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        seed=11,
        logit_bias={3: -1.5},
        allowed_token_ids=[1, 2, 3],
        bad_words=["bad"],
        min_tokens=4,
        stop_token_ids=[9],
        logprobs=3,
        prompt_logprobs=1,
    )
    options = params.to_options(eos_token_id=2, bad_words_token_ids=[[5, 6], []])
    assert options == SamplingOptions(
        temperature=0.7,
        top_p=0.8,
        top_k=0,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        seed=11,
        logit_bias={3: -1.5},
        allowed_token_ids=[1, 2, 3],
        bad_words_token_ids=[[5, 6]],
        min_tokens=4,
        stop_token_ids=[9, 2],
        logprobs=3,
        prompt_logprobs=1,
    )
    assert roundtrip(options, SamplingOptions) == options


def test_to_options_of_a_plain_request_is_all_defaults():
    options = SamplingParams().to_options(eos_token_id=2)
    assert options == SamplingOptions()
    assert msgspec.msgpack.encode(options) == msgspec.msgpack.encode(SamplingOptions())


def test_to_options_stop_ids_and_eos_only_with_min_tokens_and_without_ignore_eos():
    # the engine core stops on stop_token_ids; EOS it knows apart (eos_token_ids)
    assert SamplingParams(stop_token_ids=[9]).to_options(eos_token_id=2).stop_token_ids == [9]
    with_min = SamplingParams(min_tokens=1, stop_token_ids=[9])
    assert with_min.to_options(eos_token_id=2).stop_token_ids == [9, 2]
    ignored = SamplingParams(min_tokens=1, ignore_eos=True, stop_token_ids=[9])
    assert ignored.to_options(eos_token_id=2).stop_token_ids == [9]


def test_to_options_of_a_greedy_request():
    options = SamplingParams(temperature=0.0, seed=5, top_k=3).to_options(eos_token_id=None)
    assert (options.temperature, options.seed, options.top_k) == (0.0, None, 0)
    assert roundtrip(options, SamplingOptions) == options
