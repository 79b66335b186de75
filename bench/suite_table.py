"""The summary table of bench/gpu_suite.sh: Tessera against vLLM's numbers from the issue.

    python bench/suite_table.py $OUT

Reads the JSON files that gpu_suite.sh wrote under OUT (workloads not run are left
out), prints one Markdown table and writes OUT/summary.json. The `x vLLM` column is
how many times better Tessera is (> 1: better), for throughputs and times alike.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Getter = Callable[[Any], float]


def at(*path: str | int) -> Getter:
    """A getter of the value at `path` in a result file."""

    def get(data: Any) -> float:
        for key in path:
            data = data[key]
        return float(data)

    return get


def w3(engine: str, batch_size: int) -> Getter:
    """A getter of ms/token in latency.py's rows."""

    def get(rows: list[dict]) -> float:
        match = [r for r in rows if r["engine"] == engine and r["batch_size"] == batch_size]
        return float(match[0]["ms_per_step"])

    return get


def step_floor_ms(floors: dict) -> float:
    """The 8B shape's 16.06 GB of weights, read once a decode step at the copy bandwidth."""
    return 16.06e9 / (floors["copy_bandwidth_gbs"] * 1e9) * 1000


# (workload, metric, file, getter, vLLM's value, higher is better)
HIGHER, LOWER = True, False
ROWS: list[tuple[str, str, str, Getter, float | None, bool]] = [
    ("floor", "copy bandwidth GB/s", "floors", at("copy_bandwidth_gbs"), None, HIGHER),
    ("floor", "bf16 GEMM 8192^3 TFLOP/s", "floors", at("bf16_gemm_tflops"), None, HIGHER),
    ("floor", "8B step: weights / copy bw, ms", "floors", step_floor_ms, None, LOWER),
    ("W1", "output tok/s", "w1", at(0, "output_tokens_per_s"), 3627, HIGHER),
    ("W1", "total tok/s", "w1", at(0, "total_tokens_per_s"), None, HIGHER),
    ("W1", "transformers (64 prompts) out tok/s", "w1", at(1, "output_tokens_per_s"), None, HIGHER),
    ("W2", "output tok/s", "w2", at(0, "output_tokens_per_s"), 19478, HIGHER),
    ("W3", "batch 1 ms/token", "w3", w3("tessera", 1), 6.55, LOWER),
    ("W3", "batch 8 ms/token", "w3", w3("tessera", 8), 6.73, LOWER),
    ("W3", "transformers batch 1 ms/token", "w3", w3("hf", 1), None, LOWER),
    ("W3", "transformers batch 8 ms/token", "w3", w3("hf", 8), None, LOWER),
]
for rate, refs in (
    ("4", dict(median_ttft_ms=43.7, median_tpot_ms=7.3)),
    ("16", dict(median_ttft_ms=67.5, median_tpot_ms=11.7, output_throughput=1985)),
    ("inf", dict(median_ttft_ms=7000, median_tpot_ms=80.9, output_throughput=3448)),
):
    for what in ("ttft", "tpot", "itl"):
        for stat in ("median", "p99"):
            key = f"{stat}_{what}_ms"
            label = f"rate {rate}: {what.upper()} {stat} ms"
            ROWS.append(("W4", label, f"w4_rate{rate}", at(key), refs.get(key), LOWER))
    ROWS.append(
        ("W4", f"rate {rate}: output tok/s", f"w4_rate{rate}", at("output_throughput"),
         refs.get("output_throughput"), HIGHER)
    )  # fmt: skip
ROWS += [
    ("W5", "s to ready, cold Triton cache", "w5_cold", at("seconds_to_ready"), 110.7, LOWER),
    ("W5", "s to ready, CUDA graphs (warm)", "w5_graphs", at("seconds_to_ready"), 53.9, LOWER),
    ("W5", "s to ready, --enforce-eager (warm)", "w5_eager", at("seconds_to_ready"), 49.6, LOWER),
    ("W6", "prefix caching on: out tok/s", "w6_on", at(0, "output_tokens_per_s"), 12151, HIGHER),
    ("W6", "prefix caching off: out tok/s", "w6_off", at(0, "output_tokens_per_s"), 3473, HIGHER),
]


def lookup(get: Getter, data: Any) -> float | None:
    try:
        return get(data)
    except (KeyError, IndexError, TypeError):
        return None


def table(out: Path) -> list[dict]:
    rows = []
    for workload, metric, name, get, vllm, higher in ROWS:
        file = out / f"{name}.json"
        if not file.exists():
            continue
        value = lookup(get, json.loads(file.read_text()))
        if value is None:
            continue
        ratio = None
        if vllm is not None and value > 0:
            ratio = value / vllm if higher else vllm / value
        rows.append(dict(workload=workload, metric=metric, tessera=value, vllm=vllm, x_vllm=ratio))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def main() -> None:
    out = Path(sys.argv[1])
    rows = table(out)
    print("\n| workload | metric | Tessera | vLLM | x vLLM |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['workload']} | {r['metric']} | {_fmt(r['tessera'])} | "
            f"{_fmt(r['vllm'])} | {_fmt(r['x_vllm'])} |"
        )
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
