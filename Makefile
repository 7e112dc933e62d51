VENV ?= .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf runs/demo
	$(VENV)/bin/zjax train configs/demo.yaml output_dir=runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(PY) benchmarks/zero.py
	$(PY) benchmarks/remat.py
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/checkpoint.py

clean:
	rm -rf $(VENV) runs .pytest_cache
