"""The torch profiler in a worker, started and stopped between steps by utility calls.

Off unless TESSERA_TORCH_PROFILER_DIR names a folder (as vLLM's
VLLM_TORCH_PROFILER_DIR): `LLM.start_profile()` / `stop_profile()`, or POST
/start_profile and /stop_profile on the server. On stop each rank writes a Chrome
trace (open it in Perfetto or chrome://tracing) and a text table of the ops and
kernels that took the most time, and returns the two paths.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# (torch is imported when a profile starts: the API server reads profiler_dir() and
# must not pay for importing torch)
PROFILER_DIR_ENV = "TESSERA_TORCH_PROFILER_DIR"


def profiler_dir() -> str | None:
    return os.environ.get(PROFILER_DIR_ENV) or None


class WorkerProfiler:
    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self._prof: Any = None  # a torch.profiler.profile while running

    def start(self) -> None:
        if profiler_dir() is None:
            raise RuntimeError(f"profiling is off: set {PROFILER_DIR_ENV} to a folder")
        if self._prof is not None:
            raise RuntimeError("the profiler is already running")
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities)
        self._prof.start()

    def stop(self) -> list[str]:
        """Stop, write the trace and the table; their paths."""
        if self._prof is None:
            raise RuntimeError("the profiler is not running")
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        prof.stop()
        folder = Path(profiler_dir() or ".")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        trace, table = folder / f"{stem}.trace.json", folder / f"{stem}.txt"
        prof.export_chrome_trace(str(trace))
        table.write_text(self._table(prof))
        return [str(trace), str(table)]

    def _table(self, prof: Any) -> str:
        averages = prof.key_averages()
        if self.device.type != "cuda":
            return averages.table(sort_by="self_cpu_time_total", row_limit=40)
        try:
            return averages.table(sort_by="self_device_time_total", row_limit=40)
        except (AttributeError, KeyError, ValueError):  # older torch names it after CUDA
            return averages.table(sort_by="self_cuda_time_total", row_limit=40)
