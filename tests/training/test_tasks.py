"""Binary and multilabel runs end to end on tiny data: BCE, measures in metrics.csv, selection on validation and the
test split evaluated once, evaluate --json, predict, report, export and resume of such models (seconds each)."""

import csv
import json

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from densenet.cli import main
from densenet.data.metrics import compute_metrics, metric_keys
from densenet.data.task import Task
from densenet.inference.engines import AUTO_BF16, disagreement
from densenet.models import create_model
from densenet.models.weights import read_metadata, save_weights
from densenet.training import engine as engine_module
from densenet.training import tasks
from densenet.training import train as train_module
from densenet.training.checkpoint import load_checkpoint
from tests.data import formats

TINY = ["--model", "densenet_bc10_k4", "--batch-size", "16", "--quiet", "--threads", "1", "--device", "cpu"]


def train(*args):
    return main(["train", *TINY, *map(str, args)])


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_ENGINE_CACHE", str(tmp_path / "engine-cache"))


@pytest.fixture
def pneumonia(tmp_path):
    """A tiny binary MedMNIST file named as PneumoniaMNIST (its class names), 12 px grayscale."""
    path = tmp_path / "pneumoniamnist.npz"
    made = formats.write_medmnist(path, counts=(32, 12, 10), image_shape=(12, 12))
    return path, made


@pytest.fixture
def scenes(tmp_path):
    """MIML's layout with a seeded split (no split column or file): 30 colour images, 3 labels, 0/1 columns."""
    folder = tmp_path / "scenes"
    names = [f"{i}.png" for i in range(30)]
    formats.write_labelled_images(folder, names, size=8)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (30, 3))
    formats.write_csv(folder / "labels.csv", ["Filenames", "desert", "sea", "trees"],
                      [[n, *map(int, row)] for n, row in zip(names, labels, strict=True)])
    return folder


@pytest.mark.slow  # several commands end to end: about 6 s
def test_binary_medmnist_run_selects_on_val_and_tests_once(tmp_path, pneumonia, capsys):
    path, made = pneumonia
    run = tmp_path / "run"
    assert train("--dataset", "medmnist", "--data-dir", path, "--epochs", 3, "--pos-weight", "auto",
                 "--out", run) == 0
    out = capsys.readouterr().out
    assert "val AUROC" in out and "selected epoch" in out and "test, evaluated once on it: AUROC" in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"] == {"kind": "binary", "names": ["normal", "pneumonia"]} and config["pos_weight"] == "auto"
    table = rows(run)
    task = Task("binary", ("normal", "pneumonia"))
    assert list(table[0]) == (["epoch", "lr", "train_loss", "train_error", "val_error", "seconds", "val_loss"]
                              + [f"val_{k}" for k in metric_keys(task) if k != "error"])
    assert not any(key.startswith("test_") for key in table[0])  # the test split is not looked at per epoch
    results = json.loads((run / "results.json").read_text())
    best = max(table, key=lambda r: float(r["val_auroc"]))
    assert results["selected_epoch"] == int(best["epoch"]) and results["selected_by"] == "val_auroc"
    assert results["val"]["auroc"] == pytest.approx(float(best["val_auroc"]), abs=1e-5)
    assert results["test"]["n"] == 10 and 0 <= results["test"]["auroc"] <= 1
    meta = read_metadata(run / "model.safetensors")
    assert meta["task"] == config["task"] and meta["config"]["num_classes"] == 1 and meta["config"]["in_chans"] == 1
    assert len(meta["thresholds"]) == 1 and meta["threshold_rule"] == "youden"

    # evaluate: the test measures training reported, from the weights' task
    assert main(["evaluate", str(run), "--json", "--device", "cpu", "--engine", "eager"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "binary" and result["top1_error"] is None and result["n"] == 10
    for key in ("auroc", "acc", "map", "hamming", "f1"):
        assert result["metrics"][key] == pytest.approx(results["test"][key], abs=1e-5), key
    assert main(["evaluate", str(run), "--device", "cpu", "--engine", "eager"]) == 0
    text = capsys.readouterr().out
    assert "AUROC" in text and "ACC" in text and "Hamming loss" in text

    # predict: the positive class's probability, the thresholds from the metadata, --threshold over them
    image = tmp_path / "x.png"
    Image.fromarray(made["test_images"][0]).save(image)
    assert main(["predict", str(run), str(image), "--json", "--engine", "eager"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["task"] == "binary" and list(first["probabilities"]) == ["pneumonia"]
    assert first["thresholds"] == {"pneumonia": pytest.approx(meta["thresholds"][0])}
    p = first["probabilities"]["pneumonia"]
    for threshold, decided in (("0", "pneumonia"), ("1", "normal")):
        assert main(["predict", str(run), str(image), "--json", "--engine", "eager", "--threshold", threshold]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["class"] == decided and got["probabilities"]["pneumonia"] == pytest.approx(p)

    # report: the val and test measures, labelled
    assert main(["report", str(run)]) == 0
    report = capsys.readouterr().out
    assert "val AUROC" in report and "test AUROC" in report and f"{results['test']['auroc']:.4f}" in report


@pytest.mark.slow
def test_selection_is_on_validation_and_the_test_split_is_measured_once_on_those_weights(tmp_path, pneumonia,
                                                                                         monkeypatch):
    """Validation AUROC peaks at epoch 1, test AUROC (were it looked at) at epoch 3: epoch 1's weights are kept."""
    path, _ = pneumonia
    real = engine_module.evaluate
    scripted = {"val": [0.9, 0.6, 0.7], "test": [0.5, 0.6, 0.99]}
    calls = []

    def evaluate(model, batches, *args, **kwargs):
        split = "val" if batches.split is data_splits["val"] else "test"
        stats = real(model, batches, *args, **kwargs)
        calls.append((split, {k: v.clone() for k, v in model.state_dict().items()}))
        epoch = sum(1 for s, _ in calls if s == split) - 1
        if split == "val" and epoch < 3:  # the per-epoch evaluations; the final ones are as measured
            stats.metrics["auroc"] = scripted[split][epoch]
        return stats

    data_splits = {}
    real_load = train_module.load_data

    def load_data(*args, **kwargs):
        data = real_load(*args, **kwargs)
        data_splits.update(val=data.val, test=data.test)
        return data

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "load_data", load_data)
    run = tmp_path / "run"
    assert train("--dataset", "medmnist", "--data-dir", path, "--epochs", 3, "--lr", 0.5, "--out", run) == 0
    assert [s for s, _ in calls] == ["val", "val", "val", "val", "test"]  # test once, after the selection
    results = json.loads((run / "results.json").read_text())
    assert results["selected_epoch"] == 1
    assert [float(r["val_auroc"]) for r in rows(run)] == pytest.approx(scripted["val"])
    epoch1 = load_checkpoint(run / "checkpoint_best.pt")
    assert epoch1["epoch"] == 1 and epoch1["best"]["metric"] == "val_auroc"
    kept = load_file(run / "model.safetensors")
    final = load_checkpoint(run / "checkpoint_last.pt")["model"]
    assert all(torch.equal(kept[k], epoch1["model"][k]) for k in kept)
    assert not all(torch.equal(kept[k], final[k]) for k in kept)
    assert all(torch.equal(calls[-1][1][k], epoch1["model"][k]) for k in kept)  # the test saw epoch 1's weights


@pytest.mark.slow  # several commands end to end: about 6 s
def test_multilabel_csv_run_evaluate_predict_export_and_resume(tmp_path, scenes, monkeypatch, capsys):
    common = ["--dataset", "csv", "--data-dir", scenes, "--input-size", 8, "--seed", 3, "--epochs", 2]
    run = tmp_path / "run"
    assert train(*common, "--out", run) == 0
    capsys.readouterr()
    split = (run / "split.csv").read_text().splitlines()
    assert split[0] == "filename,split" and len(split) == 31
    tested = sum(line.endswith(",test") for line in split[1:])
    results = json.loads((run / "results.json").read_text())
    assert results["task"]["kind"] == "multilabel" and results["test"]["n"] == tested
    assert {"lrap", "map", "hamming", "auroc/desert", "ap/trees"} <= set(results["test"])
    assert "val_lrap" in rows(run)[0]

    # evaluate reads the run's split.csv (another --seed would draw another split) and the label names
    assert main(["evaluate", str(run), "--json", "--device", "cpu", "--engine", "eager"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == tested and result["labels"] == ["desert", "sea", "trees"]
    assert result["metrics"]["lrap"] == pytest.approx(results["test"]["lrap"], abs=1e-5)
    assert main(["evaluate", str(run), "--device", "cpu", "--engine", "eager"]) == 0
    text = capsys.readouterr().out
    assert "LRAP" in text and "desert" in text and "trees" in text

    # predict: a probability per label and the labels above the thresholds
    image = scenes / "images" / "0.png"
    assert main(["predict", str(run), str(image), "--json", "--engine", "eager", "--threshold", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got["probabilities"]) == {"desert", "sea", "trees"} and got["labels"] == ["desert", "sea", "trees"]
    assert main(["predict", str(run), str(image), "--engine", "eager"]) == 0
    assert "->" in capsys.readouterr().out

    # export to ONNX: the same logits, so the same probabilities
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(onnx_path)]) == 0
    from densenet.models.weights import load_weights

    model, _ = load_weights(run)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got.sigmoid(), model.eval()(x).sigmoid(), atol=1e-5)

    # resume: interrupted during epoch 2, resumed, the weights of the uninterrupted run
    real = train_module.train_one_epoch

    def interrupted(model, batches, optimizer, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, batches, optimizer, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    b = tmp_path / "b"
    assert train(*common, "--out", b) == 130
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert main(["train", "--resume", str(b), "--quiet"]) == 0
    a_weights, b_weights = load_file(run / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
    assert (b / "split.csv").read_text() == (run / "split.csv").read_text()


def test_without_a_validation_split_the_final_epoch_is_kept(tmp_path):
    folder = tmp_path / "set"
    names = [f"{i}.png" for i in range(12)]
    formats.write_labelled_images(folder, names, size=8, gray=True)
    formats.write_csv(folder / "labels.csv", ["file", "pneumonia", "split"],
                      [[n, i % 2, "train" if i < 8 else "test"] for i, n in enumerate(names)])
    run = tmp_path / "run"
    assert train("--dataset", "csv", "--data-dir", folder, "--input-size", 8, "--epochs", 2, "--out", run) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["selected_epoch"] == 2 and "val" not in results and "thresholds" not in results
    assert rows(run)[-1]["test_auroc"] != "" and not (run / "checkpoint_best.pt").exists()
    assert not (run / "split.csv").exists()  # the file's own split column says it


@pytest.mark.parametrize(("args", "words"), [
    (["--label-smoothing", 0.1], "--label-smoothing is for multiclass tasks"),
    (["--pos-weight", "auto", "--label-smoothing", 0.2], "--label-smoothing is for multiclass tasks"),
])
def test_options_that_do_not_fit_the_task_are_one_line(tmp_path, pneumonia, capsys, args, words):
    path, _ = pneumonia
    assert train("--dataset", "medmnist", "--data-dir", path, "--epochs", 1, *args, "--out", tmp_path / "r") == 2
    assert words in capsys.readouterr().err


def test_pos_weight_auto_on_a_multiclass_set_is_refused(tmp_path, capsys):
    assert train("--epochs", 1, "--pos-weight", "auto", "--out", tmp_path / "r") == 2
    assert "--pos-weight auto is for binary and multilabel tasks" in capsys.readouterr().err


def test_volumes_train_a_3d_model(tmp_path, capsys):
    """A 3D MedMNIST file trains a 3D network (spatial_dims=3), recorded in the weights' metadata."""
    formats.write_medmnist(tmp_path / "adrenalmnist3d.npz", image_shape=(6, 6, 6))
    code = train("--dataset", "medmnist", "--data-dir", tmp_path / "adrenalmnist3d.npz", "--epochs", 1,
                 "--out", tmp_path / "r")
    assert code == 0, capsys.readouterr().err
    assert read_metadata(tmp_path / "r" / "model.safetensors")["config"]["spatial_dims"] == 3
    assert json.loads((tmp_path / "r" / "results.json").read_text())["test"]["n"] == 4


def test_rgb_init_weights_fine_tune_a_grayscale_binary_model(tmp_path, pneumonia, capsys):
    """ImageNet-style 3-channel weights on 1-channel X-rays: the first convolution summed over R, G, B (timm's)."""
    path, _ = pneumonia
    source = create_model("densenet_bc10_k4", num_classes=5, in_chans=3)
    save_weights(source, tmp_path / "rgb.safetensors", {"model": "densenet_bc10_k4"})
    run = tmp_path / "run"
    assert train("--dataset", "medmnist", "--data-dir", path, "--epochs", 1, "--lr", 1e-9, "--init",
                 tmp_path / "rgb.safetensors", "--out", run) == 0
    kept = load_file(run / "model.safetensors")
    assert kept["classifier.weight"].shape == (1, source.classifier.in_features)
    expected = source.state_dict()["features.conv0.weight"].sum(1, keepdim=True)
    assert torch.allclose(kept["features.conv0.weight"], expected, atol=1e-5)


def test_engine_agreement_of_one_logit_models_is_on_the_decision():
    expected = torch.tensor([[0.02], [-0.02], [0.015], [-0.3]])
    assert disagreement(AUTO_BF16, expected + 0.01, expected) is None
    flipped = expected * torch.tensor([[-1.0], [-1.0], [-1.0], [1.0]])  # within bf16's tolerance, decisions flipped
    assert "decisions at 0.5" in disagreement(AUTO_BF16, flipped, expected)  # argmax of one column: always 0
    multi = torch.tensor([[0.02, 0.01], [-0.02, -0.01], [0.01, 0.02]])
    assert "decisions at 0.5" in disagreement(AUTO_BF16, -multi, multi, sigmoid=True)


def test_result_columns_follow_metric_keys_and_multiclass_columns_are_unchanged():
    task = Task("multilabel", ("a", "b"))
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    p = torch.tensor([[0.9, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.1]])
    stats = engine_module.Stats(0.5, 25.0, float("nan"), 4, 1.0, compute_metrics(task, y, p))
    row = tasks.result_columns(task, {"val": stats})
    assert list(row) == ["val_loss"] + [f"val_{k}" for k in metric_keys(task)]
    multiclass = tasks.result_columns(Task.multiclass(["x", "y"]), {"test": stats, "val": stats})
    assert list(multiclass) == ["test_error", "test_top5_error", "val_error"]
    best = tasks.initial_best(task, has_val=True)
    assert tasks.improved(best, {"epoch": 1, "val_auroc": 0.5})
    best = tasks.chosen(best, {"epoch": 1, "val_auroc": 0.5})
    assert not tasks.improved(best, {"epoch": 2, "val_auroc": float("nan")})
    assert not tasks.improved(best, {"epoch": 2, "val_auroc": 0.4}) and best["epoch"] == 1


@pytest.mark.slow
def test_stem_option_builds_the_run_with_that_stem_and_predict_rebuilds_it(tmp_path, capsys):
    """--stem strided is the run's model (config.yaml, the weights' config) and the weights rebuild it."""
    from densenet.models.weights import load_weights

    formats.write_medmnist(tmp_path / "adrenalmnist3d.npz", image_shape=(8, 8, 8))
    code = train("--dataset", "medmnist", "--data-dir", tmp_path / "adrenalmnist3d.npz", "--epochs", 1,
                 "--model", "densenet_bc10_k4", "--stem", "strided", "--out", tmp_path / "r")
    assert code == 0, capsys.readouterr().err
    assert read_metadata(tmp_path / "r" / "model.safetensors")["config"]["stem"] == "strided"
    assert "stem: strided" in (tmp_path / "r" / "config.yaml").read_text()
    model, _ = load_weights(tmp_path / "r")
    assert model.features.conv0.stride == (2, 2, 2)
    assert train("--model", "resnet20_cifar", "--stem", "strided", "--out", tmp_path / "x") == 2
    assert "--stem changes a DenseNet's first layers" in capsys.readouterr().err


@pytest.mark.slow
def test_volumes_that_are_not_cubes_evaluate_at_the_shape_they_trained_at(tmp_path, capsys):
    """A CSV set of (4, 5, 6) volumes trained without --input-size trains at that shape; the weights must not
    record a side that evaluate and predict would resize the volumes to (5^3), or evaluate measures another input."""
    names = [f"v{i}.npy" for i in range(12)]
    formats.write_volumes(tmp_path / "data", names, shape=(4, 5, 6))
    formats.write_csv(tmp_path / "data" / "labels.csv", ["filename", "mass", "split"],
                      [[n, i % 2, (["train"] * 6 + ["val"] * 2 + ["test"] * 4)[i]] for i, n in enumerate(names)])
    assert train("--dataset", "csv", "--data-dir", tmp_path / "data", "--epochs", 1, "--out", tmp_path / "r") == 0
    assert read_metadata(tmp_path / "r" / "model.safetensors")["input_size"] is None
    reported = json.loads((tmp_path / "r" / "results.json").read_text())["test"]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), "--data-dir", str(tmp_path / "data"), "--json",
                 "--engine", "eager"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["loss"] == pytest.approx(reported["loss"], rel=1e-5)


@pytest.mark.slow
def test_volumes_take_flip_test_time_augmentation_and_refuse_flip_shift_before_training(tmp_path, capsys):
    """--tta flip on volumes averages each volume's probability and its mirror's along the last axis (the
    oracle: the model on both, by hand); flip-shift (a 2D pixel shift) is refused before anything trains."""
    from densenet.data.augment import normalize
    from densenet.data.datasets import load_data
    from densenet.models.weights import load_weights

    path = tmp_path / "adrenalmnist3d.npz"
    formats.write_medmnist(path, image_shape=(6, 6, 6))
    assert train("--dataset", "medmnist", "--data-dir", path, "--epochs", 1, "--tta", "flip",
                 "--out", tmp_path / "r") == 0, capsys.readouterr().err
    reported = json.loads((tmp_path / "r" / "results.json").read_text())["test"]
    model, meta = load_weights(tmp_path / "r")
    test = load_data("medmnist", path, train=False).test
    x = normalize(test.images, meta["mean"], meta["std"])
    with torch.no_grad():
        p = (torch.sigmoid(model.eval()(x)) + torch.sigmoid(model(x.flip(-1)))) / 2
    y = test.labels.to(torch.float64).reshape(p.shape)
    assert reported["loss"] == pytest.approx(float(torch.nn.functional.binary_cross_entropy(p.double(), y)), rel=1e-4)
    capsys.readouterr()
    assert train("--dataset", "medmnist", "--data-dir", path, "--epochs", 1, "--tta", "flip-shift",
                 "--out", tmp_path / "s") == 2
    assert "--tta flip-shift moves 2D images" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
