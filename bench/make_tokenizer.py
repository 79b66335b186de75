"""A model folder with a generated tokenizer, for model shapes that ship no tokenizer.

    python bench/make_tokenizer.py bench/models/llama-3.1-8b /tmp/tessera-models/llama-3.1-8b

Copies the shape's config.json into OUT_DIR and writes a fast tokenizer beside it whose
vocabulary has exactly the model's vocab_size entries, so that random token ids (what the
benchmarks feed and what dummy weights produce) all detokenize: id i is the word `t{i}`
(SentencePiece style, `▁t{i}`), except the config's BOS and EOS ids, which are special
tokens. The folder then serves as --model (with --load-format dummy) and as --tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

SPACE = "\u2581"  # SentencePiece's word-start mark: decodes to a space


def _ids(value) -> list[int]:
    """A config's bos/eos_token_id: None, one id or a list of them."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [int(value)]


def build_tokenizer(vocab_size: int, bos_ids: list[int], eos_ids: list[int]) -> Tokenizer:
    specials = {i: f"<|bos_{i}|>" for i in bos_ids} | {i: f"<|eos_{i}|>" for i in eos_ids}
    vocab = {specials.get(i, f"{SPACE}t{i}"): i for i in range(vocab_size)}
    # unknown words encode as id 0; not named unk_token in tokenizer_config.json, where
    # transformers would count it special and skip it when decoding
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"{SPACE}t0"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    # the special strings are already in the vocabulary: this only marks them special
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in specials.values()]
    )
    return tok


def make_model_dir(config_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy `config_dir`/config.json into `out_dir` and write the tokenizer files there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(Path(config_dir, "config.json").read_text())
    shutil.copyfile(Path(config_dir, "config.json"), out / "config.json")
    bos, eos = _ids(config.get("bos_token_id")), _ids(config.get("eos_token_id"))
    tok = build_tokenizer(int(config["vocab_size"]), bos, eos)
    tok.save(str(out / "tokenizer.json"))
    name = {i: tok.id_to_token(i) for i in bos + eos}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # not the model type's own class
        "bos_token": name[bos[0]] if bos else None,
        "eos_token": name[eos[0]] if eos else None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings", 4096)),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config_dir", help="A folder with the model's config.json.")
    parser.add_argument("out_dir", help="Where the model folder with its tokenizer goes.")
    args = parser.parse_args()
    print(make_model_dir(args.config_dir, args.out_dir))


if __name__ == "__main__":
    main()
