# The two commands the README opens with. Both create .venv when missing and install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test install clean-venv

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "python3.11 not found; set PY=/path/to/python3.11" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP_RUN): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	@touch $@

$(STAMP_TEST): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	@touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(BIN)/slimdet demo

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)

# Benchmark-only environment (issue 4): the project plus NNCF, kept out of the project's dependencies.
# The versions `pip install -e .` picked for torch, onnx and onnxruntime are frozen as constraints before
# NNCF is installed, so NNCF cannot move them (pip fails instead).
BENCH_VENV := benchmarks/.venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
STAMP_BENCH := $(BENCH_VENV)/.installed-bench

.PHONY: bench-env

$(BENCH_BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "python3.11 not found; set PY=/path/to/python3.11" >&2; exit 1; }
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install -q --upgrade pip

$(STAMP_BENCH): $(BENCH_BIN)/python pyproject.toml benchmarks/requirements-quant.txt
	$(BENCH_BIN)/pip install -q -e .
	$(BENCH_BIN)/pip freeze --exclude-editable | grep -iE '^(torch|torchvision|onnx|onnxruntime|onnxscript|numpy)==' \
		> $(BENCH_VENV)/constraints.txt
	$(BENCH_BIN)/pip install -q -r benchmarks/requirements-quant.txt -c $(BENCH_VENV)/constraints.txt
	@touch $@

bench-env: $(STAMP_BENCH)

# Benchmark-only environment (issue 5): the project plus SCALE-Sim, for bench_scalesim.py. SCALE-Sim 3.0.0
# crashes with numpy >= 2.3, so the project and SCALE-Sim are resolved together against numpy 2.2.x
# (and the exact torch/torchvision the project pins).
SCALESIM_VENV := benchmarks/.venv-scalesim
SCALESIM_BIN := $(SCALESIM_VENV)/bin
STAMP_SCALESIM := $(SCALESIM_VENV)/.installed-scalesim

.PHONY: bench-scalesim-env

$(SCALESIM_BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "python3.11 not found; set PY=/path/to/python3.11" >&2; exit 1; }
	$(PY) -m venv $(SCALESIM_VENV)
	$(SCALESIM_BIN)/python -m pip install -q --upgrade pip

$(STAMP_SCALESIM): $(SCALESIM_BIN)/python pyproject.toml benchmarks/requirements-scalesim.txt
	$(SCALESIM_BIN)/pip install -q -e . -r benchmarks/requirements-scalesim.txt
	$(SCALESIM_BIN)/python -c "import numpy, scalesim, slimdet.hw; assert numpy.__version__.startswith('2.2.'), numpy.__version__"
	@touch $@

bench-scalesim-env: $(STAMP_SCALESIM)
