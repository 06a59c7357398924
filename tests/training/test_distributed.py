"""torchrun with two CPU processes (gloo): the run finishes and rank 0 alone wrote the run folder."""

import csv
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "densenet", "train", "--model", "densenet_bc10_k4", "--epochs", "2", "--batch-size", "128",
           "--device", "cpu", "--quiet", "--augment", "standard", "--train-subset", "512", "--out", str(run)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training densenet_bc10_k4") == 1  # rank 0 alone speaks
    assert "x 2 processes" in result.stdout
    for name in ("config.yaml", "metrics.csv", "checkpoint_last.pt", "model.safetensors", "curves.png"):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["epoch"] for r in table] == ["1", "2"]
    assert all(0 <= float(r["test_error"]) <= 100 and float(r["train_loss"]) > 0 for r in table)
    # an error over the 360 test digits (steps of 1/360), summed over the two ranks
    assert abs(float(table[-1]["test_error"]) * 3.6 - round(float(table[-1]["test_error"]) * 3.6)) < 1e-3
