"""Greedy equality of parallel layouts on GPUs, in one process (not a test: CI has no GPU).

    PYTHONPATH=. python bench/parallel_check.py --smollm2 SmolLM2.gguf \\
        --layouts 2x1 4x1 1x2 2x2     (TP x PP)

For SmolLM2 (float32, 3 prompts x 16 tokens) and tiny llama / qwen3 models (16 heads,
8 kv heads), each layout's greedy tokens against TP=1, eager (PP runs without graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from engine_core import LLM, SamplingParams


def greedy(path: str, tp: int, pp: int, prompts, device: str = "cuda") -> list[list[int]]:
    kw = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, enforce_eager=True)
    with LLM(path, device=device, dtype="float32", max_model_len=512, **kw) as llm:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smollm2", default=None)
    parser.add_argument("--layouts", nargs="+", default=["2x1", "4x1", "1x2", "2x2"])
    parser.add_argument("--device", default="cuda", help="cpu for a smoke run (gloo)")
    parser.add_argument("--archs", nargs="+", default=["llama", "qwen3"])
    args = parser.parse_args()
    from tests.helpers.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    wide = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16,
                num_key_value_heads=8)  # fmt: skip
    rng = random.Random(0)
    tiny_prompts = [[rng.randint(10, 5000) for _ in range(rng.randint(3, 40))] for _ in range(4)]
    models = [(a, str(make_tiny_model(tmp / a, a, **wide)), tiny_prompts) for a in args.archs]
    if args.smollm2 and os.path.exists(args.smollm2):
        ids = [[1, 504, 3575, 282, 4649, 314], [1, 563, 28, 1115, 30, 4521], [1, 1562, 2125, 253]]
        models.insert(0, ("SmolLM2", args.smollm2, ids))
    rows = []
    for name, path, prompts in models:
        base = greedy(path, 1, 1, prompts, args.device)
        for layout in args.layouts:
            tp, pp = (int(x) for x in layout.split("x"))
            t0 = time.time()
            try:
                same = "yes" if greedy(path, tp, pp, prompts, args.device) == base else "NO"
            except Exception as error:  # a refusal or a failure is a row too
                same = f"error: {str(error).splitlines()[-1][:200]}"
            rows.append({"model": name, "tp": tp, "pp": pp, "equal_to_tp1": same})
            print(
                f"| {name} fp32 | TP={tp} PP={pp} == TP=1 | {same} | {time.time() - t0:.0f} s |",
                flush=True,
            )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "parallel_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
