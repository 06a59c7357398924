# Everything installs into .venv from pyproject.toml; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/densenet train

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q --timeout=900

# The edit-test loop: everything not marked slow (no multi-process, SIGKILL or compile tests).
test-fast: install lint
	$(BIN)/python -m pytest -q --timeout=900 -m "not slow"

# Real CIFAR-10 from ../shared/data/cifar10 (see README): extract once.
data/cifar10/train: ../shared/data/cifar10/cifar10-jpeg.tar.gz
	mkdir -p data && tar xzf $< -C data && touch $@

.PHONY: cifar10-cpu
# The committed CPU run (docs/runs/cifar10-densenet_bc40_k12-cpu): DenseNet-BC L=40 k=12, 26 epochs, about an hour
# on 2 cores with native bf16. Run it alone on the machine: a second busy process slows every step of it.
cifar10-cpu: install data/cifar10/train
	$(BIN)/densenet train --config configs/cifar10_cpu.yaml --out runs/cifar10-cpu
