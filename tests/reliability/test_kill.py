"""SIGKILL at random moments, some inside a checkpoint write: every resume ends at the uninterrupted run's weights."""

import math
import random
import time

import pytest
import torch
from safetensors.torch import load_file

from densenet.training.checkpoint import BEST, LAST, latest_checkpoint, load_checkpoint
from tests.helpers import TINY_MODEL, make_image_folder
from tests.reliability.conftest import run_forked

EPOCHS, BATCH, PER_CLASS = 8, 8, 8  # a CIFAR-style image tree of 2 classes x 8 images of 32x32: 2 steps an epoch
STEPS = math.ceil(2 * PER_CLASS / BATCH)


def _history(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in load_checkpoint(path)["history"]]


@pytest.mark.slow  # a dozen forked trainings, each killed and resumed: minutes
def test_sigkill_anywhere_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=PER_CLASS, size=32)
    train = ["train", "--model", TINY_MODEL, "--dataset", "cifar10", "--data-dir", data, "--epochs", EPOCHS,
             "--batch-size", BATCH, "--device", "cpu", "--seed", 3, "--quiet"]
    reference = tmp_path / "reference"
    start = time.monotonic()
    assert run_forked(*train, "--out", reference, log=tmp_path / "reference.log") == 0
    epoch_seconds = (time.monotonic() - start) / EPOCHS

    rng = random.Random(2017)
    # (fault, n): "step" kills before the n-th training step of the attempt, "timed" after n epochs' time,
    # the other three at the n-th checkpoint write (see faults.py); each resumed attempt starts afresh.
    plan = [("step", rng.randint(STEPS + 1, 2 * STEPS)),  # mid epoch 2: epoch 1 is checkpointed
            ("timed", rng.uniform(0.2, 1.5)),
            ("torn", 1),
            ("timed", rng.uniform(0.2, 1.5)),
            ("before-rename", rng.randint(1, 2)),
            ("after-rename", 1),
            ("step", rng.randint(STEPS + 1, 2 * STEPS))]
    run, log = tmp_path / "run", tmp_path / "run.log"
    seen = []
    for attempt, (fault, n) in enumerate(plan):
        argv = [*train, "--out", run] if attempt == 0 else ["train", "--resume", run]
        if fault == "timed":
            code = run_forked(*argv, kill_after=n * epoch_seconds, log=log)
        else:
            code = run_forked(*argv, fault=fault, nth=n, log=log)
        assert code == -9, f"attempt {attempt} ({fault} {n}) was not killed (exit {code}):\n{log.read_text()}"
        picked = latest_checkpoint(run)
        assert picked is not None, f"no readable checkpoint after attempt {attempt} ({fault} {n})"
        epoch = load_checkpoint(picked)["epoch"]  # the checkpoint resume picks is readable...
        assert epoch >= (seen[-1] if seen else 1) and epoch < EPOCHS  # ...and never goes back
        seen.append(epoch)
        if fault == "torn":
            assert any(p.name.startswith(".tmp-") for p in run.iterdir()), "the torn write left no temporary file"

    assert run_forked("train", "--resume", run, log=log) == 0, log.read_text()
    assert seen[-1] > seen[0], f"the kills made no progress: {seen}"

    ours, theirs = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    assert _history(run / LAST) == _history(reference / LAST)  # the same losses and errors, epoch by epoch
    assert load_checkpoint(run / BEST)["epoch"] == load_checkpoint(reference / BEST)["epoch"]
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert len(metrics) == EPOCHS + 1  # one row per epoch, none repeated by the resumes
