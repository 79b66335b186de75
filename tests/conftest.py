import os

# Run Triton kernels through Triton's CPU interpreter: test machines have no GPU. This must
# be set before anything imports triton, since @triton.jit reads it at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

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
