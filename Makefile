# Everything installs into .venv from pyproject.toml; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/densenet list
	$(BIN)/densenet summary densenet121

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q --timeout=900
