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
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same steps (the tiny GPT per ZeRO stage); a persistent cache,
# fresh for each run and inherited by the CLI and multi-process subprocesses, compiles
# each once. Executables from the cache keep memory_analysis() and as_text().
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="zjax-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# `python -m zjax` runs the command line when imported.
collect_ignore = ["zjax/__main__.py"]
