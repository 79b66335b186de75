"""Incremental detokenization with stop strings: one `IncrementalDetokenizer` per request.

How the text of each new token is found. Two ways were measured on SmolLM2-135M's tokenizer,
256 requests x 256 tokens fed one token per call round-robin (bench/detokenize.py, one core of
a shared 2-core machine, so the numbers vary by run):

- the fast tokenizer's `tokenizers.decoders.DecodeStream`: the Rust tokenizer keeps a short
  window of ids, decodes it, and returns the new text once it no longer ends in a split
  character. It takes the prompt's last ids as context, so that the first output tokens decode
  with the right leading space, and it honours skip_special_tokens. 320,000 to 500,000
  tokens/s through this class (185,000 to 310,000 with two stop strings).
- the classic window in Python (prefix and read offsets, `tokenizer.decode` over the window):
  70,000 to 80,000 tokens/s, mostly transformers' per-call overhead in `decode`.

So the DecodeStream is used whenever the tokenizer is a fast one; the Python window is the
fallback for slow tokenizers (and a tokenizers too old for `DecodeStream(ids=...)`), and the
only path that honours `spaces_between_special_tokens` (fast tokenizers have no such option).
Once flushed, both give exactly the decode of all output ids (without transformers'
`clean_up_tokenization_spaces`, which a streamed text cannot follow).

Stop strings are matched in the text, token by token. The stop string that completes first wins
(ties: the one that starts first), which makes the result independent of how the text is split
into tokens. Text that could still grow into a stop string is held back from the deltas, and
released when it no longer can, or by `flush()` when the request ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import tokenizers.decoders

if TYPE_CHECKING:  # not at run time: transformers takes seconds to import (tokenizer.py)
    from transformers import PreTrainedTokenizerBase

from engine_core.tokenizer import Tokenizer

# tokenizers >= 0.21 has it; None before
_DecodeStream: Any = getattr(tokenizers.decoders, "DecodeStream", None)

# Prompt ids kept as decoding context for the first output tokens: enough for the leading space
# of SentencePiece-style tokenizers and for a character split across the prompt's last tokens.
_CONTEXT_IDS = 6
_REPLACEMENT_CHAR = "\ufffd"  # what a character split across tokens decodes to, for now


class _WindowStream:
    """The classic incremental decode over a short window of ids, in Python.

    The window holds the ids whose text was last returned (the context, `_ids[:_read]`) and the
    ids after them; a step decodes the whole window and returns what the new ids added, once the
    text no longer ends in a split character.
    """

    def __init__(self, decode: Callable[[list[int]], str], context_ids: list[int]):
        self._decode = decode
        self._ids = list(context_ids)
        self._read = len(self._ids)
        self._prefix_text = decode(self._ids)

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return None
        delta = text[len(self._prefix_text) :]
        # the ids just decoded become the context of the next ones
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta


Step = Callable[[int], str | None]  # one token id in, its new text (None: not yet) out
Decode = Callable[[list[int]], str]  # ids in, their text out, all at once


def _decoding(
    hf: PreTrainedTokenizerBase,
    context_ids: list[int],
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
    use_decode_stream: bool | None,
) -> tuple[Step, Decode]:
    """The step function of the decoding path to use, and the matching whole-sequence decode."""
    backend = getattr(hf, "backend_tokenizer", None) if hf.is_fast else None
    if use_decode_stream is not False and backend is not None and _DecodeStream is not None:
        try:
            stream = _DecodeStream(ids=context_ids, skip_special_tokens=skip_special_tokens)
        except TypeError:  # tokenizers 0.21 streams take no context ids
            stream = None
        if stream is not None:
            # decode exactly as the stream does, so that flushed text lines up with it
            stream_decode: Decode = partial(backend.decode, skip_special_tokens=skip_special_tokens)
            return partial(stream.step, backend), stream_decode
    if use_decode_stream:
        raise ValueError("use_decode_stream=True, but this tokenizer has no DecodeStream")
    decode = cast(
        Decode,
        partial(
            hf.decode,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
        ),
    )
    return _WindowStream(decode, context_ids).step, decode


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, token by token, and finds stop strings.

    `prompt_token_ids` gives the first output tokens their decoding context; the prompt's text
    itself is never returned. Stop strings are only looked for once at least `min_tokens` output
    tokens exist. Whether the EOS token is fed (and so shows up when special tokens are not
    skipped) is the caller's choice. `use_decode_stream` forces one decoding path (None: the
    fastest available), for benchmarks and tests.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        use_decode_stream: bool | None = None,
    ):
        hf = tokenizer.hf if isinstance(tokenizer, Tokenizer) else tokenizer
        self._context = list(prompt_token_ids[-_CONTEXT_IDS:])
        self._token_ids: list[int] = []
        self._decoded_tokens = 0  # output tokens whose text the stream has returned
        self._step, self._decode = _decoding(
            hf,
            self._context,
            skip_special_tokens,
            spaces_between_special_tokens,
            use_decode_stream,
        )
        self._stops = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._released: list[str] = []  # every delta returned so far
        self._held = ""  # final text held back: it may be the start of a stop string
        self._finished = False
        self.stop_string: str | None = None  # the stop string that ended the text, if any

    @property
    def output_text(self) -> str:
        """All text returned so far (deltas and flush)."""
        return "".join(self._released)

    @property
    def token_ids(self) -> list[int]:
        """The output token ids fed so far."""
        return self._token_ids

    @property
    def finished(self) -> bool:
        """True once a stop string hit or `flush()` ran; later tokens are ignored."""
        return self._finished

    def update(self, new_token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Feeds new output tokens; returns (newly final text, the stop string that hit or None).

        The text never ends in a split character, never holds text that may still become part
        of a stop string, and never goes past a stop string.
        """
        if self._finished:
            return "", self.stop_string
        pieces: list[str] = []
        token_ids, step = self._token_ids, self._step
        for token_id in new_token_ids:
            token_ids.append(token_id)
            piece = step(token_id)
            if piece is None:
                continue
            self._decoded_tokens = len(token_ids)
            if not self._stops:
                pieces.append(piece)
            elif self._add_checked(piece, pieces):
                break
        delta = pieces[0] if len(pieces) == 1 else "".join(pieces)
        if delta:
            self._released.append(delta)
        return delta, self.stop_string

    def flush(self) -> str:
        """Ends the request: returns every held-back character, split ones included."""
        if self._finished:
            return ""
        pieces: list[str] = []
        self._add_checked(self._undecoded_text(), pieces)
        text = "".join(pieces) + self._held
        self._held = ""
        self._finished = True
        if text:
            self._released.append(text)
        return text

    def _add_checked(self, piece: str, pieces: list[str]) -> bool:
        """Adds a piece of final text to `pieces`, up to a stop string; True when one hit."""
        text = self._held + piece
        if len(self._token_ids) >= self._min_tokens:
            hit = self._find_stop(text, len(self._held))
            if hit is not None:
                end, self.stop_string = hit
                pieces.append(text[:end])
                self._held = ""
                self._finished = True
                return True
        held = self._held_length(text)
        pieces.append(text[: len(text) - held])
        self._held = text[len(text) - held :]
        return False

    def _find_stop(self, text: str, checked: int) -> tuple[int, str] | None:
        """(where the output ends, stop string) of the first stop string to complete in `text`.

        `text[:checked]` was searched before, so only matches ending past it are new.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            first = checked - len(stop) + 1
            start = text.find(stop, first if first > 0 else 0)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        return (end if self._include_stop else start), stop

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        size = len(text)
        longest = 0
        for stop in self._stops:
            # a held suffix starts with the stop string's first character: try each one, from the
            # longest candidate suffix down, stopping at the first that is a prefix of it
            first = size - len(stop) + 1
            start = text.find(stop[0], first if first > 0 else 0)
            while 0 <= start and size - start > longest:
                if stop.startswith(text[start:]):
                    longest = size - start
                    break
                start = text.find(stop[0], start + 1)
        return longest

    def _undecoded_text(self) -> str:
        """The text of the output tokens the stream still holds (a split character, at the end)."""
        if self._decoded_tokens == len(self._token_ids):
            return ""
        ids = self._context + self._token_ids
        cut = len(self._context) + self._decoded_tokens  # ids before it have been returned
        start = max(0, cut - _CONTEXT_IDS)
        return self._decode(ids[start:])[len(self._decode(ids[start:cut])) :]
