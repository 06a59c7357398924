"""Bad input, one case each: one clear line naming the cause (and the file), non-zero exit, no traceback,
and nothing left in the run folder that a later --resume would trust. Odd but valid images are converted.

Each case is listed in docs/reliability.md with the test that backs it.
"""

import errno
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import files as files_module
from densenet.models import create_model
from densenet.models.weights import save_weights
from densenet.training import engine
from densenet.training.checkpoint import BEST, LAST, latest_checkpoint, load_checkpoint
from tests.helpers import BROKEN_IMAGES, TINY_MODEL, assert_user_error, make_image_folder, run_cli


def _train_args(data, out, *extra):
    return ["train", "--model", TINY_MODEL, "--dataset", "cifar10", "--data-dir", data, "--epochs", 2,
            "--batch-size", 4, "--device", "cpu", "--quiet", "--out", out, *extra]


def assert_nothing_to_trust(run):
    """A failed run leaves no folder, or one whose checkpoints (if any) are whole and no temporary files."""
    if not run.exists():
        return
    assert not list(run.glob(".tmp-*")), "a temporary file was left behind"
    assert not (run / "model.safetensors").exists(), "a failed run left final weights"
    for name in (LAST, BEST):
        if (run / name).exists():
            load_checkpoint(run / name)  # whole, or this raises


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=2, size=32)


# -- data ---------------------------------------------------------------------------------------------------------

def test_missing_data_folder(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(tmp_path / "nowhere", run))
    assert_user_error(code, err, "train", "not found under", str(tmp_path / "nowhere"))
    assert not run.exists()


def test_empty_class_folder(capsys, data, tmp_path):
    for image in (data / "train" / "dog").iterdir():
        image.unlink()
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", "holds no image files", str(data / "train" / "dog"))
    assert not run.exists()


# (file name, bytes, the reason the message must give): one list for every command that reads images.
@pytest.mark.parametrize("name, content, reason", BROKEN_IMAGES)
def test_broken_image_in_the_data(capsys, data, tmp_path, name, content, reason):
    bad = data / "train" / "cat" / name
    bad.write_bytes(content)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", f"cannot read image {bad}", reason)
    assert not run.exists()


@pytest.mark.parametrize("name, content, reason", BROKEN_IMAGES)
def test_broken_image_given_to_predict(capsys, trained, tmp_path, name, content, reason):
    bad = tmp_path / name
    bad.write_bytes(content)
    code, out, err = run_cli(capsys, "predict", trained[1], bad)
    assert_user_error(code, err, "predict", f"cannot read image {bad}", reason)


def _odd_images(folder):
    """Grayscale, RGBA, CMYK, palette (with transparency) and 16-bit images: valid, if not RGB."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.new("CMYK", (32, 32), (0, 200, 200, 10)).save(folder / "cmyk.jpg")
    palette = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P")
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)).save(folder / "deep16.png")
    return sorted(folder.iterdir())


@pytest.mark.slow
def test_odd_image_modes_are_converted_for_training_and_predict(capsys, data, tmp_path, trained):
    odd = _odd_images(data / "train" / "cat")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *_train_args(data, run, "--epochs", 1))
    assert code == 0, err
    assert "(9 images, 2 classes)" in out  # the fixture's 2 + 2 and all five odd ones
    code, out, err = run_cli(capsys, "predict", trained[1], *odd)
    assert code == 0, err
    assert all(str(path) in out for path in odd)


# -- models and checkpoints ---------------------------------------------------------------------------------------

def test_unknown_model(capsys, data, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run, "--model", "densenet_nope"))
    assert_user_error(code, err, "train", "unknown model 'densenet_nope'")
    assert not run.exists()


@pytest.mark.slow
def test_weights_of_another_architecture_for_init(capsys, data, tmp_path):
    other = tmp_path / "other.safetensors"
    save_weights(create_model("densenet_bc10_k4", num_classes=2), other, {"model": "densenet_bc10_k4"})
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run, "--init", other))
    assert_user_error(code, err, "train", "other.safetensors", "does not fit")
    assert not run.exists()


def test_resume_with_another_model(capsys, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", 2, "--model", "densenet_bc10_k4")
    assert_user_error(code, err, "train", "--model 'densenet_bc10_k4'", "would change it", "--fork NEW_DIR")
    assert load_checkpoint(run / LAST)["epoch"] == 1  # the run is untouched
    fork = tmp_path / "fork"  # asked for: the copy is made, and the checkpoint does not fit the other model
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", 2, "--model", "densenet_bc10_k4",
                           "--fork", fork)
    assert_user_error(code, err, "train", "does not fit")
    assert load_checkpoint(run / LAST)["epoch"] == 1 and not fork.exists()  # no half a fork is left


def test_weights_of_another_class_count_for_evaluate(capsys, data, tmp_path):
    ten = tmp_path / "ten-classes.safetensors"
    save_weights(create_model(TINY_MODEL, num_classes=10), ten, {"model": TINY_MODEL, "dataset": "cifar10"})
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", ten, "--dataset", "cifar10", "--data-dir", data)
    assert_user_error(code, err, "evaluate", "ten-classes.safetensors", "10", "2")


# -- options ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("--lr", "-0.1", "--lr must be a positive number, not -0.1"),
    ("--batch-size", "0", "--batch-size must be a positive integer, not 0"),
    ("--epochs", "0", "--epochs must be a positive integer, not 0"),
])
def test_impossible_option(capsys, data, tmp_path, flag, value, words):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run), flag, value)
    assert_user_error(code, err, "train", words)
    assert not run.exists()


# -- the output folder --------------------------------------------------------------------------------------------

def test_output_folder_under_a_file(capsys, data, tmp_path):
    (tmp_path / "a-file").write_text("")
    run = tmp_path / "a-file" / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", "Not a directory", str(run))


def test_unwritable_output_folder(capsys, data, tmp_path, monkeypatch):
    """Tests run as root, whom chmod does not stop: the refusal is simulated where a folder is created."""
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    run = tmp_path / "locked" / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", "Permission denied", "another --out", str(tmp_path / "locked"))
    assert not run.exists()


def test_read_only_output_folder(capsys, data, tmp_path, monkeypatch):
    """A read-only file system: creating a file in the run folder fails (simulated for root)."""
    run = tmp_path / "run"

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(run)) and "w" in (args[0] if args else kwargs.get("mode", "r")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(files_module, "open", read_only, raising=False)  # atomic_write's open
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", "Read-only file system", str(run))
    assert_nothing_to_trust(run)
    assert latest_checkpoint(run) is None


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 4])  # config.yaml (first write), or a checkpoint after epoch 1's
def test_full_disk(capsys, data, tmp_path, monkeypatch, fail_at):
    """The disk fills up: fsync reports ENOSPC (as it does for delayed allocation), from the fail_at-th write on."""
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run))
    line = assert_user_error(code, err, "train", "No space left on device", str(run))
    assert_nothing_to_trust(run)
    picked = latest_checkpoint(run)
    if fail_at == 1:
        assert "config.yaml" in line and picked is None
    else:
        assert picked is not None and load_checkpoint(picked)["epoch"] == 1  # epoch 1's checkpoint stays whole
        monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the run continues from it
        assert run_cli(capsys, "train", "--resume", run)[0] == 0


# -- divergence ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nan_loss_names_epoch_and_step_and_resume_uses_the_last_good_checkpoint(capsys, data, tmp_path, monkeypatch):
    real, calls = engine.F.cross_entropy, [0]

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # a training step (evaluation sums)
            calls[0] += 1
            if calls[0] == 3:  # 4 images, batch 2: epoch 2, step 1
                return loss * float("nan")
        return loss

    monkeypatch.setattr(engine.F, "cross_entropy", poisoned)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run, "--batch-size", 2))
    assert_user_error(code, err, "train", "nan", "epoch 2, step 1")
    assert_nothing_to_trust(run)
    state = load_checkpoint(latest_checkpoint(run))
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.setattr(engine.F, "cross_entropy", real)
    assert run_cli(capsys, "train", "--resume", run)[0] == 0  # continues from epoch 1


def test_diverging_weights_are_never_checkpointed(capsys, data, tmp_path):
    """--lr 1e30: the first step's loss is finite but its update ruins the weights; nothing is saved."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run, "--lr", "1e30"))
    assert_user_error(code, err, "train", "non-finite", "epoch 1")
    assert_nothing_to_trust(run)
    assert latest_checkpoint(run) is None
