"""Tokenizers (Hugging Face folders and GGUF files) and chat templates.

`load_tokenizer` returns a plain transformers tokenizer; `Tokenizer` wraps one and caches what
the hot paths read on every request (special ids, vocabulary size), so that callers never go
through transformers' property machinery per token.

A GGUF tokenizer is built by transformers from the file's own metadata (vocabulary, merges,
special tokens, chat template). We call `PreTrainedTokenizerFast.from_pretrained(folder,
gguf_file=name)` rather than `AutoTokenizer`: for GGUF files AutoTokenizer first rebuilds the
whole model config by parsing every metadata field of the file, which takes about 14 s for
SmolLM2-135M against 0.6 s for the tokenizer alone, and the tokenizer it builds is the same one
(checked on SmolLM2: same tokenizer.json, chat template and special ids; GGUF tokenizers are
always converted to fast tokenizers from the file's metadata).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # transformers (and the torch it imports) takes seconds: see load_tokenizer
    from transformers import PreTrainedTokenizerBase

TOKENIZER_MODES = ("auto", "slow", "mistral", "custom")

# tokenizer_config.json class names that AutoTokenizer maps to PreTrainedTokenizerFast
# (transformers 5 names the class TokenizersBackend and keeps the old name as an alias)
_PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")

# Character pairs that only a Jinja template (never a file path) contains: how a --chat-template
# value is told apart from the path of a template file without touching the file system.
_JINJA_MARKERS = ("{{", "{%", "{#")


class TokenizerLoadError(ValueError):
    """No tokenizer could be loaded from the given path; the message names the path."""


def load_tokenizer(
    path: str | os.PathLike[str],
    gguf_file: str | None = None,
    mode: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model folder, a hub name, or a GGUF file.

    `path` is a folder (or hub name) holding tokenizer files, or a `.gguf` file; `gguf_file`
    names a GGUF file inside the folder `path`. `mode` is --tokenizer-mode: `auto` takes the fast
    tokenizer when there is one, `slow` insists on a slow (pure Python) tokenizer and fails when
    the model has none. Raises `TokenizerLoadError` naming the path when nothing loads.

    transformers is imported here, not with this module: the API server imports this module
    before it starts the engine cores, and transformers (with torch) takes seconds to import,
    which then delay the whole start instead of overlapping the cores' own.
    """
    import transformers

    path = os.fspath(path)
    if mode not in TOKENIZER_MODES:
        raise ValueError(
            f"--tokenizer-mode must be one of {', '.join(TOKENIZER_MODES)}, not {mode!r}"
        )
    if mode in ("mistral", "custom"):
        raise ValueError(f"--tokenizer-mode {mode} is not supported yet; use auto or slow")
    gguf_path = _gguf_path(path, gguf_file)
    if gguf_path is not None and mode == "slow":
        raise TokenizerLoadError(
            f"--tokenizer-mode slow: the tokenizer of GGUF file {gguf_path} is always a fast "
            "tokenizer (transformers builds one from the file); use --tokenizer-mode auto"
        )
    if gguf_path is not None:
        tokenizer = _load_gguf(gguf_path)
    else:
        tokenizer = _load_folder(path, mode == "slow", trust_remote_code, revision)
    if mode == "slow" and tokenizer.is_fast:
        raise TokenizerLoadError(
            f"--tokenizer-mode slow: {path} has no slow tokenizer in transformers "
            f"{transformers.__version__} (only a fast one); use --tokenizer-mode auto"
        )
    return tokenizer


def _gguf_path(path: str, gguf_file: str | None) -> str | None:
    """The full path of the GGUF file to read, or None when the tokenizer is a folder's."""
    if gguf_file is not None and os.path.isabs(gguf_file):
        return gguf_file
    if path.endswith(".gguf"):
        return path
    if gguf_file is not None:
        return os.path.join(path, gguf_file)
    return None


def _load_gguf(gguf_path: str) -> PreTrainedTokenizerBase:
    if not os.path.isfile(gguf_path):
        raise TokenizerLoadError(f"cannot load a tokenizer: GGUF file {gguf_path} does not exist")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as exc:
        raise TokenizerLoadError(
            f"cannot load a tokenizer from GGUF file {gguf_path}: {exc}"
        ) from exc


def _names_plain_fast_class(path: str) -> bool:
    """Whether the folder's tokenizer_config.json names PreTrainedTokenizerFast itself, with
    a tokenizer.json beside it and no custom code: AutoTokenizer then loads exactly that
    class, but only after importing its auto classes and torch (5-6 s against 1.5 s on the
    2-core machine for the bench's Llama-3 tokenizer, transformers 5.24)."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("tokenizer_class") in _PLAIN_FAST_CLASSES
        and "auto_map" not in config
        and os.path.isfile(os.path.join(path, "tokenizer.json"))
    )


def _load_folder(
    path: str, slow: bool, trust_remote_code: bool, revision: str | None
) -> PreTrainedTokenizerBase:
    try:
        if not slow and _names_plain_fast_class(path):
            from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: see above

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            path, use_fast=not slow, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError, KeyError) as exc:
        # transformers' own messages here talk about repo ids or "a slow tokenizer instance to
        # convert", which hides the actual problem: nothing usable at this path.
        raise TokenizerLoadError(
            f"cannot load a tokenizer from {path}: expected a folder with tokenizer files "
            f"(tokenizer.json, or vocabulary files), a .gguf file, or a hub model name; "
            f"point --tokenizer at one ({type(exc).__name__}: {exc})"
        ) from exc


def resolve_chat_template(value: str) -> str:
    """A --chat-template value as template text: Jinja text as is, else the file it names."""
    if any(marker in value for marker in _JINJA_MARKERS):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(
            f"--chat-template {value!r} is neither a Jinja template nor a readable file: {exc}"
        ) from exc


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with every content given as one string.

    OpenAI allows content as a list of parts; text parts are joined with newlines, and any other
    part (image, audio, file) raises ValueError, since Tessera serves text-only models.
    """
    return [_normalize_message(message) for message in messages]


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ValueError(f"a chat message is a dict with a 'role' string, not {message!r}")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return dict(message)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, not {content!r}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise ValueError(
                f"message content part of type {kind!r} is not supported: only text parts "
                "({'type': 'text', 'text': ...}) are, this model takes text only"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"a text part needs a 'text' string, not {part!r}")
        texts.append(text)
    return {**message, "content": "\n".join(texts)}


class Tokenizer:
    """A transformers tokenizer with the values that hot paths read cached as plain attributes.

    `hf` is the wrapped tokenizer, for anything not covered here.
    """

    def __init__(self, hf: PreTrainedTokenizerBase):
        self.hf = hf
        self.is_fast: bool = bool(hf.is_fast)
        # The Rust tokenizer, when there is one: the incremental detokenizer streams through it.
        self.backend = getattr(hf, "backend_tokenizer", None) if self.is_fast else None
        self.eos_token_id: int | None = hf.eos_token_id
        self.bos_token_id: int | None = hf.bos_token_id
        self.all_special_ids: tuple[int, ...] = tuple(hf.all_special_ids)
        # len() counts added tokens too: one past the largest id that can come out of the model
        self.vocab_size: int = len(hf)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        gguf_file: str | None = None,
        mode: str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> Tokenizer:
        """`load_tokenizer`, wrapped."""
        return cls(load_tokenizer(path, gguf_file, mode, trust_remote_code, revision))

    @cached_property
    def id_to_token(self) -> list[str]:
        """The raw vocabulary string of every id (e.g. 'Ġworld'), built on first use."""
        return list(self.hf.convert_ids_to_tokens(list(range(self.vocab_size))))

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The model's own chat template, None when it has none."""
        return self.hf.chat_template or None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens (e.g. BOS) added as the model's config says."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`, all at once."""
        text = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return cast(str, text)  # a flat list of ids decodes to one string

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render a conversation to prompt text with the model's (or the given) chat template.

        `chat_template` overrides the model's: Jinja text or the path of a file holding it.
        `template_kwargs` are extra variables for the template (e.g. enable_thinking).
        """
        template = resolve_chat_template(chat_template) if chat_template else None
        if template is None and self.chat_template is None:
            raise ValueError(
                "this model's tokenizer has no chat template; pass one with --chat-template "
                "(Jinja text or a file path)"
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "add_generation_prompt and continue_final_message cannot both be set: the first "
                "opens a new assistant message, the second continues the last one"
            )
        from jinja2 import TemplateError

        try:
            rendered = self.hf.apply_chat_template(
                normalize_messages(messages),
                tools=cast(Any, tools),  # transformers' annotation wants list[dict | Callable]
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **dict(template_kwargs or {}),
            )
        except TemplateError as e:  # the template rejects this conversation
            raise ValueError(f"the chat template cannot render this conversation: {e}") from e
        assert isinstance(rendered, str)  # tokenize=False renders text
        return rendered
