# Everything installs into .venv from pyproject.toml at the versions of constraints.txt; `make demo` and `make test`
# work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt

.PHONY: install demo test test-fast lint wheel-check test-torch211
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test]'
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

# The package as a user gets it: wheel and sdist built and checked by twine, the wheel installed into a clean venv
# that already holds the pinned torch, which pip must leave as it is (.ci/wheel_check.sh; about 3 minutes here).
wheel-check: install
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test,dist]'
	PYTHON=$(PYTHON) bash .ci/wheel_check.sh

# The oldest torch the package supports (pyproject.toml), as the GPU machines hold it: torch 2.11.0 and
# torchvision 0.26.0 from PyPI into build/venv-torch211 (a download of several GB: not part of CI), the rest at
# constraints.txt's versions; then the tests not marked slow and scripts/gpu_bench.sh --tiny under it.
TORCH211 := build/venv-torch211
$(TORCH211)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(TORCH211)
	$(TORCH211)/bin/pip install -q --upgrade pip
	$(TORCH211)/bin/pip install -q torch==2.11.0 torchvision==0.26.0
	grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+|setuptools)==' $(CONSTRAINTS) \
	  > $(TORCH211)/constraints.txt  # torch 2.11.0 itself needs setuptools<82
	$(TORCH211)/bin/pip install -q -c $(TORCH211)/constraints.txt -e '.[test]' torch==2.11.0 torchvision==0.26.0
	touch $@

test-torch211: $(TORCH211)/.installed
	status=0; \
	$(TORCH211)/bin/python -m pytest -q --timeout=900 -m "not slow" -p no:cacheprovider || status=1; \
	PYTHON=$(TORCH211)/bin/python bash scripts/gpu_bench.sh $(TORCH211)/gpu-bench-tiny --tiny || status=1; \
	exit $$status

# Real CIFAR-10 from ../shared/data/cifar10 (see README): extract once.
data/cifar10/train: ../shared/data/cifar10/cifar10-jpeg.tar.gz
	mkdir -p data && tar xzf $< -C data && touch $@

.PHONY: cifar10-cpu
# The committed CPU run (docs/runs/cifar10-densenet_bc40_k12-cpu): DenseNet-BC L=40 k=12, 26 epochs, about an hour
# on 2 cores with native bf16. Run it alone on the machine: a second busy process slows every step of it.
cifar10-cpu: install data/cifar10/train
	$(BIN)/densenet train --config configs/cifar10_cpu.yaml --out runs/cifar10-cpu

# Medical and multi-label runs (docs/medical.md): PneumoniaMNIST (binary, ../shared/data/medmnist) and MIML
# (multi-label photos with a CSV of labels, ../shared/data/miml), each from scratch on the CPU, chosen on val,
# tested once. SEED picks the seed of the PneumoniaMNIST run (the committed runs: 0, 1, 2).
.PHONY: pneumonia-cpu miml-cpu adrenal3d-cpu adrenal3d64-cpu
SEED ?= 0
pneumonia-cpu: install
	$(BIN)/densenet train --config configs/pneumoniamnist_cpu.yaml --seed $(SEED) --out runs/pneumoniamnist-seed$(SEED)

data/miml/labels.csv: ../shared/data/miml/miml.tar
	mkdir -p data && tar xf $< -C data && touch $@

miml-cpu: install data/miml/labels.csv
	$(BIN)/densenet train --config configs/miml_cpu.yaml --out runs/miml-cpu

# Volumes: AdrenalMNIST3D (CT shapes, binary, ../shared/data/medmnist) at 28^3 and 64^3, a 3D DenseNet-BC each.
adrenal3d-cpu: install
	$(BIN)/densenet train --config configs/adrenalmnist3d_cpu.yaml --out runs/adrenalmnist3d-cpu

adrenal3d64-cpu: install
	$(BIN)/densenet train --config configs/adrenalmnist3d_64_cpu.yaml --out runs/adrenalmnist3d64-cpu
