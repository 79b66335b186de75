"""Tensor and pipeline parallelism at scale (the TP=4/8 issue), in one run on a GPU host.

    PYTHONPATH=. python bench/tp_scale.py --tps 4 8 [--smollm2 SmolLM2.gguf] \\
        [--parts greedy,throughput,latency,startup] [--budget 570]
    PYTHONPATH=. python bench/tp_scale.py --smoke     # tiny models on the CPU (gloo), TP=2

Parts:
- greedy: tiny random models (llama, qwen3, opt, gpt2; 16 heads, 8 kv heads, so that
  TP=8 divides them) and SmolLM2 from --smollm2 when the file exists, float32: greedy
  tokens at TP=N (each N of --tps) and at PP=2 against TP=1. A refusal is reported.
- throughput: the Llama-3.1-70B shape (dummy bf16 weights, generated tokenizer),
  bench/throughput.py, 1000 prompts 1024 in / 128 out, temperature 1.0, at each TP.
- latency: bench/latency.py, batch 1 and 8, 32 in / 128 out, at each TP.
- startup: `tessera serve` of the 70B shape at the largest TP, launch to first 200 /health.
Every run is a subprocess with a timeout, cut to what is left of --budget seconds, so
that the table always prints; rows print as they come. JSON goes to $OUT/tp_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_tokenizer import make_model_dir  # sibling scripts
from startup import time_to_ready

ROWS: list[dict] = []
START = time.monotonic()
TINY_ARCHS = ("llama", "qwen3", "opt", "gpt2")
# head counts that TP=2, 4 and 8 divide; head_dim 16 (qwen3 keeps its own 32)
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=8)
TINY_OVERRIDES = {
    "llama": WIDE,
    "qwen3": WIDE,
    "opt": dict(hidden_size=256, ffn_dim=512, num_attention_heads=16, word_embed_proj_dim=256),
    "gpt2": dict(n_embd=256, n_inner=512, n_head=16),
}


def record(part: str, check: str, result: str) -> None:
    ROWS.append({"part": part, "check": check, "result": result})
    print(f"[{part}] {check}: {result}", flush=True)


def time_left(args) -> float:
    return args.budget - (time.monotonic() - START)


def run_json(cmd: list[str], limit: float, args) -> list:
    """Run `cmd` under min(limit, budget left); the JSON values it printed, one a line.
    Raises RuntimeError with the end of its output when it fails or runs out of time."""
    timeout = min(limit, time_left(args) - 15)
    if timeout < 30:
        raise RuntimeError("skipped: the time budget is spent")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if out.returncode != 0:
        print(out.stderr.strip()[-1500:], flush=True)
        last = (out.stderr.strip().splitlines() or [""])[-1]  # a refusal, or the error
        raise RuntimeError(f"exit {out.returncode}: {last}")
    values = [json.loads(x) for x in out.stdout.splitlines() if x.startswith(("{", "["))]
    if not values:
        raise RuntimeError(f"printed no result: {out.stdout.strip()[-600:]}")
    return values


def greedy_tokens(model: str, tp: int, pp: int, args) -> list:
    cmd = [sys.executable, "bench/tp_check.py", "--greedy", model, "--device", args.device]
    return run_json(cmd + ["--tp", str(tp), "--pp", str(pp)], 300, args)[-1]


def check_greedy(name: str, model: str, args) -> None:
    try:
        want = greedy_tokens(model, 1, 1, args)
    except RuntimeError as error:
        record("greedy", f"{name} TP=1", f"FAILED {error}")
        return
    for tp, pp in [(tp, 1) for tp in args.tps if tp > 1] + [(1, 2)]:
        label = f"{name} TP={tp}" if pp == 1 else f"{name} PP={pp}"
        try:
            same = greedy_tokens(model, tp, pp, args) == want
            record("greedy", f"{label} == TP=1", "yes" if same else "NO (tokens differ)")
        except RuntimeError as error:
            record("greedy", f"{label} == TP=1", f"not run: {error}")


def part_greedy(args, tmp: Path) -> None:
    from tests.helpers.tiny_models import make_tiny_model

    for arch in TINY_ARCHS:
        model = make_tiny_model(tmp / arch, arch, **TINY_OVERRIDES[arch])
        check_greedy(f"tiny {arch} fp32", str(model), args)
    if args.smollm2 and Path(args.smollm2).exists():
        check_greedy("SmolLM2 fp32", args.smollm2, args)
    elif args.smollm2:
        record("greedy", "SmolLM2", f"skipped: {args.smollm2} does not exist")


def part_throughput(args, model: str) -> None:
    for tp in args.tps:
        cmd = [sys.executable, "bench/throughput.py", *engine_args(args, model, tp)]
        cmd += ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len)]
        cmd += ["--output-len", str(args.output_len), "--temperature", "1.0"]
        try:
            r = run_json(cmd, 480, args)[0]
            record(
                "throughput",
                f"70B TP={tp} output tok/s",
                f"{r['output_tokens_per_s']} (total {r['total_tokens_per_s']}, {r['elapsed_s']} s)",
            )
        except RuntimeError as error:
            record("throughput", f"70B TP={tp}", f"FAILED {error}")


def part_latency(args, model: str) -> None:
    for tp in args.tps:
        cmd = [sys.executable, "bench/latency.py", *engine_args(args, model, tp)]
        cmd += ["--batch-size", "1", "8", "--input-len", str(args.latency_input_len)]
        cmd += ["--output-len", str(args.output_len), "--num-iters", "3", "--num-iters-warmup", "1"]
        try:
            for r in run_json(cmd, 360, args):
                record(
                    "latency",
                    f"70B TP={tp} batch {r['batch_size']} ms/token",
                    str(r["ms_per_step"]),
                )
        except RuntimeError as error:
            record("latency", f"70B TP={tp}", f"FAILED {error}")


def part_startup(args, model: str) -> None:
    tp = max(args.tps)
    log = os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "tp_scale_server.log")
    try:
        if time_left(args) < 60:
            raise RuntimeError("skipped: the time budget is spent")
        seconds = time_to_ready(engine_args(args, model, tp), 8766, time_left(args) - 30, log)
        record("startup", f"70B TP={tp} serve to first 200 /health", f"{seconds:.1f} s")
    except RuntimeError as error:
        print(str(error), flush=True)
        record("startup", f"70B TP={tp}", f"FAILED {str(error).strip().splitlines()[-1]}")


def engine_args(args, model: str, tp: int) -> list[str]:
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    return [
        *("--model", model, "--load-format", "dummy", "--dtype", dtype, "--device", args.device),
        *("--max-model-len", "2048", "--tensor-parallel-size", str(tp)),
    ]


def big_model(args, tmp: Path) -> str:
    """The 70B shape's folder with a generated tokenizer (a tiny llama's for --smoke)."""
    src = Path("bench/models/llama-3.1-70b")
    if args.smoke:
        from tests.helpers.tiny_models import make_tiny_model

        src = make_tiny_model(tmp / "src-llama", "llama", max_position_embeddings=4096, **WIDE)
    return str(make_model_dir(src, tmp / "llama-3.1-70b"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tps", type=int, nargs="+", default=[4])
    parser.add_argument("--smollm2", default=None, help="SmolLM2 .gguf file, if at hand.")
    parser.add_argument("--parts", default="greedy,throughput,latency,startup")
    parser.add_argument("--budget", type=float, default=570, help="Seconds for the whole run.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on the CPU.")
    args = parser.parse_args()
    # on SIGTERM, unwind: subprocess.run kills its child, time_to_ready stops its server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.device = "cpu" if args.smoke else "cuda"
    args.num_prompts, args.input_len, args.output_len, args.latency_input_len = (
        (4, 24, 8, 8) if args.smoke else (1000, 1024, 128, 32)
    )
    tmp = Path(tempfile.mkdtemp(prefix="tp_scale_"))
    parts = args.parts.split(",")
    if "greedy" in parts:
        part_greedy(args, tmp)
    model = big_model(args, tmp)
    for name, run in (
        ("throughput", part_throughput),
        ("latency", part_latency),
        ("startup", part_startup),
    ):
        if name in parts:
            run(args, model)
    print("\n| part | check | result |\n| --- | --- | --- |")
    for r in ROWS:
        print(f"| {r['part']} | {r['check']} | {r['result'][:160]} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tp_scale.json").write_text(json.dumps(ROWS, indent=2))


if __name__ == "__main__":
    main()
