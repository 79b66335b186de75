"""POST /start_profile and /stop_profile: there only when TESSERA_TORCH_PROFILER_DIR is set."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from executor.profiler import PROFILER_DIR_ENV
from tests.api_server.serve_helpers import kill_all, launch, process_tree, stop, wait_ready


@pytest.mark.slow
def test_profile_endpoints_write_the_workers_files(tmp_path):
    server = launch([], env={PROFILER_DIR_ENV: str(tmp_path)})
    try:
        wait_ready(server)
        assert requests.post(server.url + "/start_profile", timeout=30).status_code == 200
        again = requests.post(server.url + "/start_profile", timeout=30)
        assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
        body = {"prompt": [1, 2, 3], "max_tokens": 3}
        assert requests.post(server.api_url + "/completions", json=body, timeout=60).ok
        stopped = requests.post(server.url + "/stop_profile", timeout=60)
        assert stopped.status_code == 200
        files = [Path(f) for f in stopped.json()["files"]]
        assert len(files) == 2 and all(f.parent == tmp_path and f.stat().st_size for f in files)
    finally:
        tree = process_tree(server.proc.pid)
        stop(server)
        kill_all(tree)
