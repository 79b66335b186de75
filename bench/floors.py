"""The device's floors: copy bandwidth (GB/s, read + write) and the bf16 matrix rate.

    python bench/floors.py [--device cuda] [--gemm-n 8192] [--output-json floors.json]

Copy: device-to-device copy of 1 GiB, median of 10. GEMM: an n x n x n bf16 matmul,
median of 10, as TFLOP/s. CUDA times come from events; on the CPU (smoke runs) from
the wall clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], device: str, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / median_seconds(lambda: b.copy_(a), device) / 1e9  # read + write


def gemm_tflops(device: str = "cuda", n: int = 8192, dtype=torch.bfloat16) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / median_seconds(lambda: a @ b, device) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gemm-n", type=int, default=8192)
    parser.add_argument("--copy-bytes", type=int, default=1 << 30)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {
        "device": name,
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(args.device, args.copy_bytes), 1),
        "bf16_gemm_tflops": round(gemm_tflops(args.device, args.gemm_n), 1),
        "gemm_n": args.gemm_n,
    }
    print(json.dumps(result), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
