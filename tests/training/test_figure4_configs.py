"""configs/figure4/: one recipe for every network of the Figure 4 comparison, each file loading and building."""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from densenet.models import create_model
from densenet.training.options import resolve_options

REPO = Path(__file__).parents[2]
CONFIGS = sorted((REPO / "configs" / "figure4").glob("*.yaml"))
PER_NETWORK = {"model", "out", "description"}  # all a file may change


def test_the_issues_list_is_there():
    names = {p.stem for p in CONFIGS}
    assert {"densenet_bc40_k12", "densenet40_k12", "resnet20_cifar", "resnet32_cifar", "resnet56_cifar"} <= names
    assert names & {"densenet_bc64_k12", "densenet_bc76_k12"} and names & {"densenet_bc40_k24", "densenet_bc100_k12"}
    assert any(re.match(r"^densenet_[bc]\d+_k\d+$", n) for n in names)  # a DenseNet-B or -C


def test_every_file_is_the_same_recipe_but_for_its_network():
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS}
    first = {k: v for k, v in next(iter(recipes.values())).items() if k not in PER_NETWORK}
    for name, recipe in recipes.items():
        assert {k: v for k, v in recipe.items() if k not in PER_NETWORK} == first, name
        assert recipe["model"] == name and recipe["out"] == f"runs/figure4/{name}"  # the runner's folders


def test_the_runner_knows_every_network():
    script = (REPO / "scripts" / "figure4.sh").read_text()
    order = re.search(r"ORDER=\(([^)]*)\)", script)[1].split()
    assert sorted(order) == sorted(p.stem for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_config_loads_and_builds_its_network(path):
    options = resolve_options(path)
    assert (options.dataset, options.epochs, options.eval_every, options.tta) == ("cifar10", 4, 1, "none")
    assert options.small_crop_epochs < options.epochs and options.drop_rate == 0.0
    if options.model.startswith("resnet") and importlib.util.find_spec("pytorchcv") is None:
        pytest.skip("pytorchcv is not installed (pip install densenet-paper[compare])")
    with torch.device("meta"):
        model = create_model(options.model, num_classes=10, in_chans=3, drop_rate=options.drop_rate,
                             memory_efficient=options.memory_efficient)
    assert sum(p.numel() for p in model.parameters()) > 100_000


@pytest.mark.slow  # starts a process
def test_the_runner_skips_finished_runs_resumes_checkpointed_ones_and_starts_the_rest(tmp_path):
    """scripts/figure4.sh with stand-ins for densenet (records its arguments; a new run "finishes" at once) and for
    the matmul peak (no training)."""
    stub = tmp_path / "densenet"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'if [ "$1 $2" = "train --config" ]; then\n'
                    '  out=${@: -1}; touch "$out/model.safetensors" "$out/config.yaml"\n'
                    '  echo epoch > "$out/metrics.csv"\n'
                    'fi\n')
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\necho "machine: Stub CPU, fp32 matmul peak 99 GFLOP/s (1 threads, $2)"\n')
    for file in (stub, python):
        file.chmod(0o755)
    runs, keep = tmp_path / "runs", tmp_path / "keep"
    for name, file in (("densenet_bc40_k12", "model.safetensors"), ("resnet20_cifar", "checkpoint_last.pt")):
        (runs / name).mkdir(parents=True)
        (runs / name / file).write_text("")
        (runs / name / "metrics.csv").write_text("")
    (keep / "resnet32_cifar").mkdir(parents=True)  # finished on another clone: its committed record
    (keep / "resnet32_cifar" / "metrics.csv").write_text("epoch\n")
    env = dict(os.environ, DENSENET=str(stub), PYTHON=str(python), CALLS=str(tmp_path / "calls"), RUNS=str(runs),
               KEEP=str(keep), DATA_DIR="DATA", OUT=str(tmp_path / "figure"), LOCK=str(tmp_path / "lock"))
    result = subprocess.run(["bash", str(REPO / "scripts" / "figure4.sh"), "densenet_bc40_k12", "resnet20_cifar",
                             "resnet32_cifar", "densenet_b40_k12"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "densenet_bc40_k12: finished" in result.stdout and "resnet32_cifar: finished" in result.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"train --resume {runs}/resnet20_cifar",
                     f"train --config configs/figure4/densenet_b40_k12.yaml --data-dir DATA --out "
                     f"{runs}/densenet_b40_k12",
                     f"analyze figure4 {runs}/densenet_bc40_k12 {runs}/resnet20_cifar {keep}/resnet32_cifar "
                     f"{keep}/densenet_b40_k12 --out {tmp_path}/figure"]
    log = (runs / "densenet_b40_k12" / "train.log").read_text().splitlines()
    assert log == ["machine: Stub CPU, fp32 matmul peak 99 GFLOP/s (1 threads, before the run)",
                   "machine: Stub CPU, fp32 matmul peak 99 GFLOP/s (1 threads, after the run)"]
    assert sorted(f.name for f in (keep / "densenet_b40_k12").iterdir()) == ["config.yaml", "metrics.csv", "train.log"]
    assert not (keep / "resnet20_cifar").exists()  # resumed, but (here) not finished: nothing kept
    unknown = subprocess.run(["bash", str(REPO / "scripts" / "figure4.sh"), "resnet21_cifar"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no configs/figure4/resnet21_cifar.yaml" in unknown.stderr
