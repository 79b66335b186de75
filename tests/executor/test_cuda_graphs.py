"""The step graphs' buffers and padding, on the CPU: a stand-in "graph" replays by running
the captured forward on the buffers, so every step goes through the padded metadata a
real graph would see (CUDA itself is checked by bench/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from engine_core import LLM
from executor.cuda_graphs import MIXED, MIXED_MAX_SEQS, StepGraphs, mixed_seqs, mixed_sizes
from tests.helpers.generate import greedy_tokens

pytestmark = pytest.mark.usefixtures("in_process")


def test_mixed_sizes_and_their_sequences() -> None:
    assert mixed_sizes(8192) == [16, 32, 64, 128, 256, 512]
    assert mixed_sizes(100) == [16, 32, 64]
    assert mixed_seqs(16) == 16 and mixed_seqs(512) == MIXED_MAX_SEQS
    graphs = StepGraphs(None, [], [1, 2, 4], 8, 1024, torch.device("cpu"), mixed=[16, 32, 128])
    assert graphs.mixed_size(20, 3, 100) == 32
    assert graphs.mixed_size(16, 16, 100) == 16
    assert graphs.mixed_size(129, 2, 100) is None  # more tokens than the largest graph
    assert graphs.mixed_size(100, MIXED_MAX_SEQS + 1, 100) is None  # too many sequences
    assert graphs.mixed_size(20, 3, 2000) is None  # a context past --max-seq-len-to-capture
    assert graphs.padded_size(3, 100) == 4


class _EagerReplay:
    """Stands in for a CUDA graph: replaying runs the captured forward on the buffers."""

    def __init__(self, graphs: StepGraphs, key: tuple[int, str]) -> None:
        self.graphs, self.key = graphs, key
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.graphs.outputs[self.key] = self.graphs._forward(*self.key)


def test_padded_steps_give_the_eager_tokens(tiny_llama) -> None:
    # Prompts of 3..38 tokens: their prefill steps fill mixed graphs of 16..64 tokens with
    # padding tokens and sequences; a prompt of 200 tokens goes in chunks of the 64-token
    # budget beside decodes, mixed steps too; decode batches of 1..9 pad to 1..16.
    prompts = [list(range(100 + i, 103 + 5 * i)) for i in range(8)] + [list(range(7, 207))]
    with LLM(str(tiny_llama), max_model_len=256, block_size=16) as llm:
        want = greedy_tokens(llm, prompts, 12)
    with LLM(
        str(tiny_llama),
        max_model_len=256,
        block_size=16,
        max_num_batched_tokens=64,
        max_num_seqs=16,
        distributed_executor_backend="uni",
    ) as llm:
        runner = llm.engine.core.executor.worker.runner
        graphs = runner._step_graphs(mixed=True)
        replays = {key: _EagerReplay(graphs, key) for key in graphs._keys()}
        graphs.graphs = replays  # type: ignore[assignment]
        runner.graphs = graphs
        assert greedy_tokens(llm, prompts, 12) == want
    mixed = sum(r.replays for (_, kind), r in replays.items() if kind == MIXED)
    decode = sum(r.replays for (_, kind), r in replays.items() if kind != MIXED)
    assert mixed > 0 and decode > 0
