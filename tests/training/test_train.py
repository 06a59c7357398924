"""``densenet train`` / ``evaluate`` end to end on tiny models and the built-in digits (seconds each)."""

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from densenet.cli import main
from densenet.models import create_model
from densenet.models.weights import read_metadata, save_weights
from densenet.training import train as train_module
from densenet.training.checkpoint import load_checkpoint

TINY = ["--model", "densenet_bc10_k4", "--batch-size", "128", "--quiet", "--threads", "1"]


def train(*args):
    return main(["train", *TINY, *map(str, args)])


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_run_folder_has_everything_and_evaluate_agrees(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--epochs", 2, "--out", run) == 0
    out = capsys.readouterr().out
    assert "epoch   2/2" in out and "test error" in out.splitlines()[-1]
    for name in ("config.yaml", "metrics.csv", "curves.png", "checkpoint_last.pt", "checkpoint_best.pt",
                 "model.safetensors"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert not list(run.glob(".tmp-*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "densenet_bc10_k4" and config["dataset"] == "digits" and config["epochs"] == 2
    table = rows(run)
    assert [r["epoch"] for r in table] == ["1", "2"]
    assert {"epoch", "lr", "train_loss", "train_error", "test_error", "seconds"} <= set(table[0])
    assert float(table[0]["lr"]) == pytest.approx(0.1) and float(table[1]["lr"]) == pytest.approx(0.01)
    meta = read_metadata(run / "model.safetensors")
    assert meta["model"] == "densenet_bc10_k4" and meta["dataset"] == "digits" and meta["classes"][3] == "3"
    assert meta["input_size"] == 8 and len(meta["mean"]) == 1 and meta["config"]["in_chans"] == 1
    state = load_checkpoint(run / "checkpoint_last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "config", "rng", "best"} <= set(state)
    assert state["epoch"] == 2

    assert main(["evaluate", "--checkpoint", str(run), "--json", "--device", "cpu", "--engine", "eager"]) == 0  # exact
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 360
    assert result["top1_error"] == pytest.approx(float(table[-1]["test_error"]), abs=1e-3)
    assert 0 <= result["top5_error"] <= result["top1_error"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [[], ["--schedule", "onecycle", "--label-smoothing", 0.1, "--weight-decay-on",
                                           "weights", "--tta", "flip"]], ids=["step", "onecycle"])
def test_resume_after_any_epoch_gives_exactly_the_uninterrupted_weights(tmp_path, monkeypatch, schedule):
    common = ["--epochs", 3, "--seed", 7, "--augment", "standard", "--drop-rate", 0.1, "--device", "cpu", *schedule]
    assert train(*common, "--out", tmp_path / "a") == 0

    real = train_module.train_one_epoch
    stop_at = {"epoch": 1}

    def interrupted(model, batches, optimizer, epoch, *args, **kwargs):
        if epoch == stop_at["epoch"]:
            raise KeyboardInterrupt
        return real(model, batches, optimizer, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    b = tmp_path / "b"
    assert train(*common, "--out", b) == 130  # Ctrl-C during epoch 2
    assert load_checkpoint(b / "checkpoint_last.pt")["epoch"] == 1 and not (b / "model.safetensors").exists()
    stop_at["epoch"] = 2
    assert main(["train", "--resume", str(b), "--quiet"]) == 130  # resumed, then interrupted during epoch 3
    stop_at["epoch"] = -1
    assert main(["train", "--resume", str(b), "--quiet"]) == 0

    a_weights, b_weights = load_file(tmp_path / "a" / "model.safetensors"), load_file(b / "model.safetensors")
    assert a_weights.keys() == b_weights.keys()
    for key in a_weights:
        assert torch.equal(a_weights[key], b_weights[key]), key
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in rows(tmp_path / "a")]
    assert drop_time == [{k: v for k, v in r.items() if k != "seconds"} for r in rows(b)]


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_module.train_one_epoch

    def poisoned(model, batches, optimizer, epoch, *args, **kwargs):
        if epoch == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real(model, batches, optimizer, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", poisoned)
    run = tmp_path / "run"
    assert train("--epochs", 3, "--out", run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 2, step 1" in err[0] and "nan" in err[0]
    assert load_checkpoint(run / "checkpoint_last.pt")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in load_checkpoint(run / "checkpoint_last.pt")["model"].values())
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize("args, words", [
    (["--lr", "0"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--dataset", "mnist"], "unknown data set 'mnist'"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/nothing"], "cifar-10-batches-py"),
    (["--amp", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--config", "{tmp}/missing.yaml"], "does not exist"),
    (["--model", "densenet_bc11_k4"], "depth 11"),
    (["--init", "{tmp}/missing.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line_and_no_run_folder(tmp_path, capsys, args, words):
    run = tmp_path / "run"
    code = main(["train", "--quiet", "--epochs", "1", "--out", str(run),
                 *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("densenet train: error:") and words in err[0]
    assert not run.exists()


@pytest.mark.slow
def test_existing_run_is_not_overwritten_and_resume_checks_the_architecture(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--epochs", 1, "--out", run) == 0
    assert train("--epochs", 1, "--out", run) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--model", "densenet_bc16_k4", "--quiet"]) == 2
    assert "--model 'densenet_bc16_k4' (the run's: 'densenet_bc10_k4') would change it" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "already finished 1 epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_init_fine_tunes_with_a_new_classifier_and_refuses_another_architecture(tmp_path, capsys):
    source = create_model("densenet_bc10_k4", num_classes=5, in_chans=1)
    save_weights(source, tmp_path / "five.safetensors", {"model": "densenet_bc10_k4", "classes": list("abcde")})
    assert train("--epochs", 1, "--lr", 1e-9, "--out", tmp_path / "run", "--init", tmp_path / "five.safetensors") == 0
    tuned = load_file(tmp_path / "run" / "model.safetensors")
    assert torch.allclose(tuned["features.conv0.weight"], source.features.conv0.weight, atol=1e-6)
    assert tuned["classifier.weight"].shape[0] == 10
    other = create_model("densenet_bc16_k4", num_classes=10, in_chans=1)
    save_weights(other, tmp_path / "other.safetensors", {"model": "densenet_bc16_k4"})
    assert train("--epochs", 1, "--out", tmp_path / "run2", "--init", tmp_path / "other.safetensors") == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_bf16_channels_last_memory_efficient_train(tmp_path):
    assert train("--epochs", 1, "--amp", "bf16", "--channels-last", "--memory-efficient", "--out", tmp_path / "r") == 0
    assert float(rows(tmp_path / "r")[0]["train_loss"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("efficient", [False, True])
def test_memory_efficient_runs_evaluate_at_the_training_batch_size(efficient, monkeypatch, tmp_path):
    # Evaluation batches are twice the training batch, except where the user asked for less memory: there
    # they would set the process's peak (train.eval_size).
    from densenet.models.densenet import DenseNet

    sizes = []
    real = DenseNet.forward
    monkeypatch.setattr(DenseNet, "forward", lambda self, x: sizes.append((self.training, x.shape[0]))
                        or real(self, x))
    flags = ["--memory-efficient"] if efficient else []
    assert train("--epochs", 1, "--batch-size", 64, "--eager", *flags, "--out", tmp_path / "r") == 0
    assert max(n for training, n in sizes if training) == 64
    assert max(n for training, n in sizes if not training) == (64 if efficient else 128)


def test_evaluate_errors(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    model = create_model("densenet_bc10_k4", num_classes=10, in_chans=1)
    save_weights(model, tmp_path / "w.safetensors", {"model": "densenet_bc10_k4"})
    assert main(["evaluate", "--checkpoint", str(tmp_path / "w.safetensors")]) == 2
    assert "pass --dataset" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "w.safetensors"), "--dataset", "digits",
                 "--ten-crop"]) == 2
    assert "--ten-crop is for imagenet" in capsys.readouterr().err


def test_streamed_folder_training(tmp_path):
    from tests.data import formats

    formats.write_class_folders(tmp_path / "data" / "train", ["cat", "dog"], 6, size=(24, 20), ext=".jpg")
    formats.write_class_folders(tmp_path / "data" / "val", ["cat", "dog"], 2, size=(20, 24), ext=".jpg")
    run = tmp_path / "run"
    assert train("--dataset", "folder", "--data-dir", tmp_path / "data", "--input-size", 16, "--epochs", 2,
                 "--batch-size", 4, "--workers", 0, "--out", run) == 0
    table = rows(run)
    assert len(table) == 2 and float(table[0]["test_error"]) in (0.0, 25.0, 50.0, 75.0, 100.0)
    meta = read_metadata(run / "model.safetensors")
    assert meta["classes"] == ["cat", "dog"] and meta["input_size"] == 16 and meta["dataset"] == "folder"


@pytest.mark.slow
def test_svhn_reports_the_test_error_of_the_lowest_validation_error_epoch(tmp_path, capsys):
    from tests.data import formats

    formats.write_svhn(tmp_path / "svhn", {"train": 60, "extra": 50, "test": 20})
    run = tmp_path / "run"
    assert train("--dataset", "svhn", "--data-dir", tmp_path / "svhn", "--epochs", 3, "--batch-size", 16,
                 "--out", run) == 0
    table = rows(run)
    assert all("val_error" in r for r in table)
    best = min(table, key=lambda r: (float(r["val_error"]), int(r["epoch"])))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"test error {float(best['test_error']):.2f}% (epoch {best['epoch']}, lowest validation error)" in last_line
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["drop_rate"] == 0.2 and config["augment"] == "none"
