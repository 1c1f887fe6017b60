# Two commands matter (README "Quick start"): `make demo` and `make test`.
# Both install on first use and reuse the environment afterwards.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU torch wheel lies on local disk here. Elsewhere override, e.g. TORCH_SPEC=torch==2.14.1.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
STAMP := $(VENV)/.installed

.PHONY: install demo test bench quality lint clean triton36 gpu-check

install: $(STAMP)

# Re-runs only when the dependency declaration or this file changes.
$(STAMP): pyproject.toml Makefile scripts/install_data.sh selfsup/data/csrc/view_op.cc
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	bash scripts/install_data.sh $(PY)
	# the fused DALI CPU operator (selfsup/data/dali_plugin.py); best effort: without a
	# C++ compiler DALI CPU pipelines keep DALI's stock operators
	$(PY) -c "from selfsup.data import dali_plugin; print(dali_plugin.build())" \
		|| echo "install: fused DALI operator not built" >&2
	touch $@

demo: install
	$(PY) train.py

test: install
	bash scripts/run_tests.sh $(PY)

# Benchmarks at every shape, production ones included (slow on CPU).
bench: install
	$(PY) -m pytest bench --benchmark-enable --benchmark-only -m "" \
		--benchmark-json=bench/results/latest.json

quality: install
	$(PY) bench/quality.py

# The kernels under triton 3.6 (the GPU images' version) in their own venv; not part of CI
# (~13 min on the 2-core dev machine, ~3 of them the venv build; VENV36=dir reuses a venv).
# TRITON36_ARGS go to pytest, e.g. TRITON36_ARGS="-x -k dino".
triton36:
	bash scripts/triton36_check.sh $(TRITON36_ARGS)

# On a CUDA machine with torch + triton already there (no install, no network): kernels vs
# float64, timings vs ROOFLINE, 20 training steps per method; about 8 minutes (docs/gpu-check.md).
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

lint: install
	$(PY) -m pip install -q ruff && $(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .benchmarks
