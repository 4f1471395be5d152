# The README's two commands: `make quickstart` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch lies on this disk; GPU users install their own torch before `pip install -e .`.
TORCH   ?= torch==2.13.0

.PHONY: quickstart test venv clean

$(BIN)/potstill: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/potstill

quickstart: venv
	$(BIN)/potstill quickstart

test: venv
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
