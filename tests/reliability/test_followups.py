"""Issue 13's fault follow-ups: stale temporaries, finished-but-unsaved runs, runs killed before their first
checkpoint, a diverged model's JSON, and write errors that say what to do."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from densenet.errors import DenseNetError
from densenet.models.weights import load_weights, save_weights
from densenet.training.checkpoint import LAST, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.helpers import TINY_MODEL, assert_user_error, make_image_folder, run_cli
from tests.reliability.conftest import run_forked


def _train_args(data, out, epochs=2):
    return ["train", "--model", TINY_MODEL, "--dataset", "cifar10", "--data-dir", data, "--epochs", epochs,
            "--batch-size", 4, "--device", "cpu", "--quiet", "--seed", 1, "--out", out]


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=2, size=32)


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# -- temporaries of killed writers ---------------------------------------------------------------------------------

def test_temporaries_of_dead_writers_are_swept_at_the_next_save(tmp_path):
    dead = tmp_path / f".tmp-{_dead_pid()}-{LAST}"
    ours = tmp_path / f".tmp-{os.getpid()}-metrics.csv"  # this process's own (e.g. another thread's write)
    live = tmp_path / ".tmp-1-config.yaml"  # PID 1 is alive: maybe a writer, never deleted
    for path in (dead, ours, live):
        path.write_bytes(b"half a file")
    save_checkpoint(tmp_path / LAST, {"epoch": 1})
    assert not dead.exists() and ours.exists() and live.exists()
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1


@pytest.mark.slow
def test_a_torn_checkpoint_write_leaves_nothing_after_the_resume(tmp_path, data):
    run = tmp_path / "run"
    assert run_forked(*_train_args(data, run), fault="torn", nth=2) == -9  # killed writing epoch 1's 2nd file
    assert list(run.glob(".tmp-*")), "the kill left no temporary file to sweep"
    assert run_forked("train", "--resume", run) == 0
    assert not list(run.glob(".tmp-*"))


# -- killed after the last checkpoint, before model.safetensors ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["torchrun-restart", "resume"])
def test_a_run_killed_before_its_final_weights_writes_them(capsys, tmp_path, data, monkeypatch, how):
    run = tmp_path / "run"
    assert run_cli(capsys, *_train_args(data, run))[0] == 0
    expected = load_file(str(run / "model.safetensors"))
    (run / "model.safetensors").unlink()  # what a kill between the last checkpoint and the weights leaves
    if how == "torchrun-restart":
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        code, out, err = run_cli(capsys, *_train_args(data, run))  # torchrun runs the same command again
    else:
        code, out, err = run_cli(capsys, "train", "--resume", run)
    assert code == 0, err
    assert "had finished its 2 epochs but not written its final weights" in out
    written = load_file(str(run / "model.safetensors"))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert load_weights(run / "model.safetensors")[1]["classes"] == ["cat", "dog"]
    code, _, err = run_cli(capsys, "train", "--resume", run)  # now it really is finished
    assert_user_error(code, err, "train", "already finished 2 epochs")


@pytest.mark.slow
def test_a_process_killed_right_after_its_last_checkpoint_gets_its_final_weights(capsys, tmp_path, data, monkeypatch):
    """A real SIGKILL just after the last checkpoint's rename (1 epoch: checkpoint_last.pt, then _best.pt)."""
    run = tmp_path / "run"
    assert run_forked(*_train_args(data, run, epochs=1), fault="after-rename", nth=2) == -9
    assert load_checkpoint(run / LAST)["epoch"] == 1
    assert not (run / "model.safetensors").exists() and not (run / "metrics.csv").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, out, err = run_cli(capsys, *_train_args(data, run, epochs=1))
    assert code == 0, err
    assert "had finished its 1 epoch but not written its final weights" in out
    state = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in load_checkpoint(run / LAST)["model"].items() if k in state)
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header and epoch 1


# -- killed before the first checkpoint ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_leaves_a_reusable_out(capsys, tmp_path, data):
    run = tmp_path / "run"
    assert run_forked(*_train_args(data, run), fault="step", nth=1) == -9
    assert (run / "config.yaml").is_file() and latest_checkpoint(run) is None
    code, out, err = run_cli(capsys, *_train_args(data, run))
    assert code == 0, err
    assert f"--out {run} holds a run that stopped before its first checkpoint" in out
    assert load_checkpoint(run / LAST)["epoch"] == 2 and (run / "model.safetensors").is_file()


def test_a_run_still_going_is_never_reused(capsys, tmp_path, data):
    from densenet.training.run_folder import RunLock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    with RunLock(run):  # a writer still going holds the folder's lock (flock: even another open in this process)
        code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", f"is in use by a run still going (process {os.getpid()})")
    assert (run / "config.yaml").read_text() == "model: x\n"


# -- evaluate --json on a diverged model ---------------------------------------------------------------------------

def test_evaluate_json_of_a_diverged_model_is_valid_json_and_fails(capsys, tmp_path, trained):
    data, run, _ = trained
    model, metadata = load_weights(run)
    with torch.no_grad():
        model.features.norm5.weight.fill_(float("nan"))
    save_weights(model, tmp_path / "diverged.safetensors", metadata)
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "diverged.safetensors", "--data-dir", data, "--json",
                             "--device", "cpu", "--workers", 0)
    result = json.loads(out)  # strict JSON: NaN would not parse as a value of the standard
    assert code != 0
    assert result["diverged"] is True and result["top1_error"] is None and result["loss"] is None
    assert_user_error(code, err, "evaluate", "diverged")
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "diverged.safetensors", "--data-dir", data,
                             "--device", "cpu", "--workers", 0)
    assert out == ""
    assert_user_error(code, err, "evaluate", "the weights diverged", "evaluate an earlier checkpoint")
    code, out, _ = run_cli(capsys, "evaluate", run, "--data-dir", data, "--json", "--device", "cpu", "--workers", 0)
    assert code == 0 and json.loads(out)["diverged"] is False and json.loads(out)["top1_error"] is not None


# -- write errors say what to do -------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free space on that disk, or write elsewhere (another --out)"),
                                         (errno.EACCES, "make the folder writable"),
                                         (errno.EROFS, "read-only: write elsewhere (another --out)")])
def test_write_errors_name_the_file_and_say_what_to_do(tmp_path, monkeypatch, code, words):
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    target = tmp_path / "run" / LAST
    target.parent.mkdir()
    with pytest.raises(DenseNetError) as info:
        save_checkpoint(target, {"epoch": 1})
    message = str(info.value)
    assert str(target) in message and ".tmp-" not in message and words in message
    assert not list(target.parent.iterdir())


def test_full_disk_during_training_says_what_to_do(capsys, tmp_path, data, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(data, run))
    assert_user_error(code, err, "train", "No space left on device", "free space", "another --out",
                      str(run / "config.yaml"))





# -- broken images in streamed data sets, found up front -------------------------------------------------------------

def test_check_data_lists_every_broken_file_and_fails(capsys, data):
    from tests.helpers import BROKEN_IMAGES

    bad = []
    for i, (name, content, _) in enumerate(BROKEN_IMAGES):
        path = data / ("train", "test")[i % 2] / "dog" / name
        path.write_bytes(content)
        bad.append(path)
    (data / "train" / "cat" / "notes.txt").write_text("not an image, not listed by the data sets either")
    for extra in (["--workers", 1], ["--workers", 2, "--no-cache"]):
        code, out, err = run_cli(capsys, "check-data", data, *extra)
        assert code == 1
        lines = out.splitlines()
        assert len(lines) == len(BROKEN_IMAGES)
        for path, (_, _, reason) in zip(bad, BROKEN_IMAGES, strict=True):
            assert any(line.startswith(f"cannot read image {path}: ") and reason in line for line in lines), lines
        assert "checked 11 image files" in err and f"{len(BROKEN_IMAGES)} broken" in err and "Traceback" not in err
    # the readable files are remembered: a second check decodes only the others
    code, out, err = run_cli(capsys, "check-data", data)
    assert code == 1 and len(out.splitlines()) == 3 and "checked 3 image files" in err and "8 more unchanged" in err
    for path in bad:
        path.unlink()
    code, out, err = run_cli(capsys, "check-data", data, "--quiet")
    assert code == 0 and out == "" and "checked 0 image files" in err and "all readable; 8 more unchanged" in err
    # a file changed since (new size and time) is decoded again
    victim = data / "test" / "cat" / "0.png"
    victim.write_bytes(victim.read_bytes()[:40])
    code, out, err = run_cli(capsys, "check-data", data, "--quiet")
    assert code == 1 and out.startswith(f"cannot read image {victim}: ") and "checked 1 image files" in err
    # folders named one by one have caches of their own
    code, out, err = run_cli(capsys, "check-data", data / "train", "--quiet")
    assert code == 0 and "checked 4 image files" in err


def test_check_data_bad_arguments(capsys, tmp_path):
    code, _, err = run_cli(capsys, "check-data", tmp_path / "nowhere")
    assert_user_error(code, err, "check-data", "nowhere: no such file or folder")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "check-data", tmp_path / "empty")
    assert_user_error(code, err, "check-data", "no image files")


def test_a_broken_file_met_mid_epoch_points_to_check_data(data):
    from densenet.data.folders import ImageFiles, scan

    classes, samples = scan(data / "train")
    samples[0][0].write_bytes(b"")
    with pytest.raises(DenseNetError, match=rf"empty file .*densenet check-data {data / 'train'}\)$"):
        ImageFiles(classes, samples, transform=lambda image: image)[0]
