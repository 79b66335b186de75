import os

# Run Triton kernels through Triton's CPU interpreter: test machines have no GPU. This must
# be set before anything imports triton, since @triton.jit reads it at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

# One OpenMP thread per process. The two pytest workers share two cores with the engine,
# server and worker processes they start; torch's default of a thread per core in each of
# them oversubscribes the cores, and its idle threads spin: on the 2-core machine the
# suite took 908 s with the default and 628 s with one thread (test_server.py 226 s and
# 74 s; up to 507 s beside another engine-heavy file). Set before anything imports
# torch, so that it holds in these processes too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A small CPU KV cache (GiB) keeps each test engine's start-up short; tests that need a
# particular size pass --num-gpu-blocks-override.
os.environ.setdefault("TESSERA_CPU_KVCACHE_SPACE", "0.25")
# Profiling endpoints exist only with this set; the tests that want them set it.
os.environ.pop("TESSERA_TORCH_PROFILER_DIR", None)


import pytest  # noqa: E402  (after the environment above, which must come first)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine core in the test's own process (its worker too with the uni backend),
    so a test can reach into it: llm.engine.core.executor.worker.runner."""
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama folder, one per test module."""
    from tests.helpers.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def pytest_collection_modifyitems(items):
    """Files that hold slow tests first (a stable sort: files and the tests in each keep
    their order otherwise). Under `--dist loadfile` xdist hands the files out by their
    number of tests, most first, and in this order among equals: a slow file of one test
    handed out last (test_compile.py, ~35 s) kept one worker busy that long after the
    other had finished; now the quick one-test files come last."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
