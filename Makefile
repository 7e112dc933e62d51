VENV ?= .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: demo test install bench gpu-check clean

# The tested versions (constraints.txt) inside the ranges pyproject.toml declares.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf runs/demo
	$(VENV)/bin/zjax train configs/demo.yaml output_dir=runs/demo

# Two workers (pytest-xdist): the suite is compile-bound, 1.4x faster on 2 cores than one process.
# The docstring examples of zjax and pallas_kernels run too (--doctest-modules).
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist worksteal --doctest-modules tests zjax pallas_kernels

BENCHMARKS := zero tensor long_context pipeline moe comm_compression remat kernels checkpoint data inference quantization compression_quality rlhf

# Runs every benchmark and writes what they print, with date and machine, to benchmarks/RESULTS.md.
bench: $(VENV)/.installed
	{ echo "# Benchmark results"; echo; echo "\`make bench\` on $$(date -u +%Y-%m-%d), $$(uname -m), $$(nproc) cores, $$($(PY) -c 'import jax; print("jax", jax.__version__)')"; \
	  for b in $(BENCHMARKS); do echo; echo "## benchmarks/$$b.py"; echo; echo '```'; $(PY) benchmarks/$$b.py 2>&1 | grep -v '^WARNING'; echo '```'; done; } \
	  | tee benchmarks/RESULTS.md.tmp && mv benchmarks/RESULTS.md.tmp benchmarks/RESULTS.md

# On a machine with one GPU and JAX already installed (nothing is downloaded): installs zjax
# without dependencies into that Python and runs benchmarks/gpu_check.py. Bring wheels of
# what that Python lacks (pydantic) and put them on PYTHONPATH first.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
