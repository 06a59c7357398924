"""A run folder has one writer: real ``densenet train`` processes started together on one folder, for a new run and
for a resume, and a run killed with SIGKILL, whose lock the kernel drops so that its own resume goes on.

Each process is a fresh interpreter (``python -m tests.reliability.faults FAULT N train ...``: the CLI with every
training step slowed by N tenths of a second (``pause``), so that the first process is still training when the
second meets the folder, or with its config.yaml held back N tenths of a second (``slow-config``), so that two runs
started together both find the folder empty). Digits, a tiny model, 64 training images, one epoch.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from densenet.training.checkpoint import LAST, load_checkpoint
from tests.helpers import REPO, subprocess_env

TINY = ["--model", "densenet_bc10_k4", "--train-subset", "64", "--batch-size", "16", "--device", "cpu", "--quiet",
        "--threads", "1", "--workers", "0"]
PAUSE = "5"  # tenths of a second before each of the 4 steps of an epoch: 2 s of training at least


def _start(*argv, pause: str = PAUSE, fault: str = "pause") -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.reliability.faults", fault, pause, *map(str, argv)]
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("densenet train: error: ")]


@pytest.mark.slow
def test_two_trainings_started_together_in_one_folder_one_trains_the_other_is_refused(tmp_path):
    run = tmp_path / "x"
    # Each waits 5 s before its config.yaml lands: both find the folder empty, as two runs started at one moment do
    # (a check before writing, as the .owner file was, lets both through).
    first = _start("train", *TINY, "--epochs", 1, "--lr", 0.1, "--out", run, fault="slow-config", pause="50")
    second = _start("train", *TINY, "--epochs", 1, "--lr", 0.05, "--out", run, fault="slow-config", pause="50")
    results = {first.pid: (*_finish(first), 0.1), second.pid: (*_finish(second), 0.05)}
    assert sorted(code for code, *_ in results.values()) == [0, 2], results
    winner, (_, _, _, lr) = next((pid, r) for pid, r in results.items() if r[0] == 0)
    _, _, err, _ = next(r for r in results.values() if r[0] == 2)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"is in use by a run still going (process {winner})" in lines[0] or "already holds a run" in lines[0]
    # everything in the folder is the winner's: its lr in config.yaml and in the checkpoint, one event file
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == lr
    assert load_checkpoint(run / LAST)["config"]["lr"] == lr
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert (run / ".lock").read_text().strip() == str(winner)


@pytest.mark.slow
def test_two_resumes_of_one_run_at_once_one_continues_the_other_is_refused(tmp_path):
    run = tmp_path / "run"
    code, _, err = _finish(_start("train", *TINY, "--epochs", 1, "--out", run, pause="0"))
    assert code == 0, err
    first = _start("train", "--resume", run, "--epochs", 2)
    second = _start("train", "--resume", run, "--epochs", 2)
    results = {first.pid: _finish(first), second.pid: _finish(second)}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(pid for pid, (code, _, _) in results.items() if code == 0)
    _, _, err = next(r for r in results.values() if r[0] == 2)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"is in use by a run still going (process {winner})" in lines[0] or "already finished 2" in lines[0]
    history = load_checkpoint(run / LAST)["history"]
    assert [row["epoch"] for row in history] == [1, 2]  # epoch 2 trained once, by one process
    assert len((run / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_a_run_killed_with_sigkill_blocks_no_resume_but_a_live_one_does(tmp_path):
    run = tmp_path / "run"
    training = _start("train", *TINY, "--epochs", 20, "--out", run)  # 40 s at least: it is killed long before
    deadline = time.monotonic() + 300
    while not (run / LAST).exists():  # epoch 1 checkpointed: the run is in epoch 2
        assert training.poll() is None, training.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    code, _, err = _finish(_start("train", "--resume", run, pause="0"))  # while it still runs: refused
    assert code == 2 and f"is in use by a run still going (process {training.pid})" in "".join(_error_lines(err))
    training.kill()  # SIGKILL: no handler runs, only the kernel releases the lock
    training.wait()
    assert training.returncode == -9
    code, out, err = _finish(_start("train", "--resume", run, pause="0"))
    assert code == 0, err
    assert "resuming" in out
    assert load_checkpoint(run / LAST)["epoch"] == 20 and (run / "model.safetensors").is_file()
    assert all(torch.isfinite(v).all() for v in load_checkpoint(run / LAST)["model"].values()
               if v.is_floating_point())
    assert Path(run / ".lock").is_file()
