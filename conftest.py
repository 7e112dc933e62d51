"""Every test and doctest runs on 8 simulated CPU devices, with one compilation cache for the
whole run (this file sits at the root so that it applies before anything imports JAX, to the
doctests of zjax/ and pallas_kernels/ as to tests/)."""
import os
import sys
import tempfile
from pathlib import Path

# The tests' shared helpers (gpt_helpers, third_party_models) import from any tests/ subfolder.
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

# The tests' programs are tiny and compiled once each: XLA:CPU's backend (LLVM) optimization
# costs more than it saves, so it runs at level 0 (HLO passes, buffer assignment and thus
# memory_analysis() and the HLO text the tests read are the same; measured ~20% less wall time).
# XLA:CPU's MLIR fusion emitters compile a train step ~3x slower than its classic elemental
# emitters (~3 s against ~10 s of CPU for the tiny GPT's step on 8 devices) and its code runs no
# faster here; without them the collectives in the HLO the tests read are the same and
# memory_analysis() within a few hundred bytes (fusion decisions differ slightly). (Also
# compiling each module in one piece, --xla_cpu_parallel_codegen_split_count=1, saved ~10% more
# but changed the last bit of optax's adamw in tests/train/test_onebit.py's bit-for-bit check.)
# Subprocesses the tests start get the same flags (tests/gpt_helpers.py: xla_flags).
# XLA:CPU aborts a program whose collective waits 40 s for a device thread; two workers, their
# subprocesses and 8 simulated devices each on 2 cores can starve one that long (seen twice in
# tests/train/test_offload.py during a full run; the test passes alone), so the suite waits 300 s.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_collective_call_terminate_timeout_seconds=300")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + TEST_XLA_FLAGS)
os.environ["ZJAX_TEST_XLA_FLAGS"] = TEST_XLA_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same steps (the tiny GPT per ZeRO stage); a persistent cache,
# fresh for each run and inherited by the CLI and multi-process subprocesses, compiles
# each once. Executables from the cache keep memory_analysis() and as_text().
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="zjax-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# `python -m zjax` runs the command line when imported.
collect_ignore = ["zjax/__main__.py"]
