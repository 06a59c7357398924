"""torchrun --max-restarts: a worker killed mid-epoch makes the job restart from the last checkpoint and finish.

When torchrun starts a failed job again it sets TORCHELASTIC_RESTART_COUNT > 0 and runs the same command;
``densenet train`` then continues the run it began in --out (recognised by a config.yaml holding exactly
this command's options) from its last checkpoint, or starts it again if none was written yet.

The end-to-end test uses two CPU processes (gloo). Rank 1 SIGKILLs itself before a chosen training step
on the first attempt only (tests/reliability/faults.py, a test tool: the library has no crash hook).
The other tests check the restart logic in one process, with the variable set by hand.
"""

import csv
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from densenet.training.checkpoint import LAST, latest_checkpoint, load_checkpoint
from tests.helpers import REPO, TINY_MODEL, assert_user_error, make_image_folder, run_cli, subprocess_env
from tests.reliability.conftest import run_forked

EPOCHS, PER_CLASS, BATCH = 3, 8, 8  # 16 images: 2 steps an epoch in one process, 2 per rank in two


def _train_args(data, run, epochs=EPOCHS):
    return ["train", "--model", TINY_MODEL, "--dataset", "cifar10", "--data-dir", data, "--epochs", epochs,
            "--batch-size", BATCH, "--device", "cpu", "--quiet", "--seed", 1, "--out", run]


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=PER_CLASS, size=32)


@pytest.mark.slow
def test_torchrun_worker_killed_mid_epoch_restarts_from_the_last_checkpoint_and_finishes(tmp_path, data):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "2", "--monitor-interval", "0.5",
           "-m", "tests.reliability.faults", "step", "3",  # rank 1 dies before its step 3: epoch 2, step 1
           *map(str, _train_args(data, run))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                            env=subprocess_env(FAULT_RANK="1"))
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    assert "torchrun restart 1: resuming" in result.stdout and "after epoch 1" in result.stdout, log
    assert load_checkpoint(run / LAST)["epoch"] == EPOCHS
    with open(run / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == [str(e) for e in range(1, EPOCHS + 1)]
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_restart_resumes_exactly(capsys, tmp_path, data, monkeypatch):
    assert run_forked(*_train_args(data, tmp_path / "reference")) == 0
    run = tmp_path / "run"
    assert run_forked(*_train_args(data, run), fault="step", nth=3) == -9  # killed in epoch 2
    assert load_checkpoint(latest_checkpoint(run))["epoch"] == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, out, err = run_cli(capsys, *_train_args(data, run))  # the same command, as torchrun runs it again
    assert code == 0, err
    assert "torchrun restart 1: resuming" in out and "after epoch 1" in out
    ours, reference = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "reference" /
                                                                               "model.safetensors"))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_restart_before_the_first_checkpoint_starts_again(capsys, tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    assert run_forked(*_train_args(data, run), fault="step", nth=1) == -9  # killed at the first step
    assert (run / "config.yaml").is_file() and latest_checkpoint(run) is None
    # (a plain rerun reuses the folder too, saying so: tests/reliability/test_followups.py)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert code == 0, err
    assert load_checkpoint(run / LAST)["epoch"] == EPOCHS


def test_restart_never_continues_another_run(capsys, tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    assert run_cli(capsys, *_train_args(data, run, epochs=1))[0] == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, _, err = run_cli(capsys, *_train_args(data, run, epochs=2))  # other options: not the run this job began
    assert_user_error(code, err, "train", "already holds a run")
    assert load_checkpoint(run / LAST)["epoch"] == 1
