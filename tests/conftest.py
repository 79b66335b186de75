import os

# Run Triton kernels through Triton's CPU interpreter: test machines have no GPU. This must
# be set before anything imports triton, since @triton.jit reads it at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

# A small CPU KV cache (GiB) keeps each test engine's start-up short; tests that need a
# particular size pass --num-gpu-blocks-override.
os.environ.setdefault("TESSERA_CPU_KVCACHE_SPACE", "0.25")
# Profiling endpoints exist only with this set; the tests that want them set it.
os.environ.pop("TESSERA_TORCH_PROFILER_DIR", None)
