"""The worker process freezes its startup heap, keeping the collector off the steps."""

from __future__ import annotations

import gc

from engine_core import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model


def test_a_worker_process_freezes_its_startup_objects(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama")
    ext = "tests.helpers.worker_classes.HeapState"
    before = gc.get_freeze_count()
    with LLM(str(model_dir), max_model_len=128, worker_extension_cls=ext) as llm:
        frozen = llm.collective_rpc("frozen_objects")[0]
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    # torch, the model and the loaders: tens of thousands of objects, out of the
    # collector's walks from the first step on
    assert frozen > 10_000
    assert len(out[0].outputs[0].token_ids) == 4
    assert gc.get_freeze_count() == before  # the user's process is left alone
