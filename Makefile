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
