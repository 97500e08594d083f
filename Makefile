# One command each on a fresh machine: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A bare `torch` requirement pulls a multi-GB CUDA build; pin the CPU wheel unless told otherwise.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.svfseg-installed

.PHONY: setup demo test bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/svfseg demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The SVF rows of `make bench` at small input sizes: a check after every change to svf/ (< 5 min on 2 idle cores).
bench-quick: $(STAMP)
	$(PY) benchmarks/bench_svf.py --quick --json bench_results/bench_svf_quick.json

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
