"""``densenet evaluate`` on streamed folders: single centre crop and ten-crop, top-1 and top-5 as JSON; engines."""

import json

import pytest
import torch

from densenet.cli import main
from densenet.errors import DenseNetError
from densenet.models import DenseNet
from densenet.models.weights import save_weights
from densenet.training.evaluate import evaluate_weights
from tests.data import formats


def _tiny_imagenet_form(tmp_path, classes):
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, bottleneck_width=4,
                     compression=0.5, stem="imagenet", num_classes=len(classes))
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"model": "tiny", "classes": classes, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225], "input_size": 32, "dataset": "folder"})
    return model, path


def test_single_and_ten_crop_on_a_folder(tmp_path, capsys):
    classes = ["a", "b", "c", "d", "e", "f"]
    formats.write_class_folders(tmp_path / "data" / "val", classes, 2, size=(48, 40), ext=".jpg")
    model, path = _tiny_imagenet_form(tmp_path, classes)
    assert main(["evaluate", str(path), "--data-dir", str(tmp_path / "data"), "--json",
                 "--workers", "0", "--device", "cpu", "--engine", "eager"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["n"] == 12 and single["dataset"] == "folder" and not single["ten_crop"]
    assert 0 <= single["top5_error"] <= single["top1_error"] <= 100
    ten = evaluate_weights(str(path), data_dir=str(tmp_path / "data"), workers=0, device="cpu", ten_crop=True,
                           engine="eager")
    assert ten["n"] == 12 and ten["ten_crop"]

    # the oracle: resize 37 (= 32 * 256 / 224), crops by torchvision, softmax averaged by hand
    from torchvision import transforms

    from densenet.data.images import load_image

    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406],
                                                                           [0.229, 0.224, 0.225])])
    model.eval()
    hits = 0
    for label, name in enumerate(classes):
        for j in range(2):
            img = transforms.Resize(37)(load_image(tmp_path / "data" / "val" / name / f"{j:04d}.jpg"))
            crops = torch.stack([norm(c) for c in transforms.TenCrop(32)(img)])
            with torch.no_grad():
                hits += int(model(crops).softmax(-1).mean(0).argmax() == label)
    assert ten["top1_error"] == round(100 * (1 - hits / 12), 4)


def test_class_count_mismatch_is_refused(tmp_path, capsys):
    formats.write_class_folders(tmp_path / "data" / "val", ["a", "b", "c"], 1, size=(40, 40))
    _, path = _tiny_imagenet_form(tmp_path, ["a", "b"])
    assert main(["evaluate", "--checkpoint", str(path), "--data-dir", str(tmp_path / "data"), "--workers", "0"]) == 2
    assert "2 classes but folder has 3" in capsys.readouterr().err


@pytest.fixture
def _engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_ENGINE_CACHE", str(tmp_path / "engine-cache"))


@pytest.mark.slow
@pytest.mark.usefixtures("_engine_cache")
def test_every_installed_engine_gives_eager_s_errors_on_the_same_images(tmp_path, capsys):
    from densenet.devices import native_bf16
    from densenet.inference.engines import ENGINES

    classes = ["a", "b", "c", "d"]
    formats.write_class_folders(tmp_path / "data" / "val", classes, 3, size=(40, 40), ext=".jpg")
    _, path = _tiny_imagenet_form(tmp_path, classes)
    data = str(tmp_path / "data")
    eager = evaluate_weights(str(path), data_dir=data, workers=0, device="cpu", batch_size=5, engine="eager")
    assert eager["engine"] == "eager"
    for engine in ["auto", *[e for e in ENGINES if e not in ("compile", "openvino-bf16") and not e.endswith("-int8")]]:
        if engine == "auto" and native_bf16(torch.device("cpu")):
            continue  # auto is openvino-bf16 here: not exact (its choice and bf16 check: tests/inference)
        try:
            got = evaluate_weights(str(path), data_dir=data, workers=0, device="cpu", batch_size=5, engine=engine)
        except DenseNetError as exc:  # an optional package that is not installed
            assert "pip install" in str(exc)
            continue
        assert got["engine"] == engine or engine == "auto"
        assert (got["top1_error"], got["top5_error"], got["n"]) == (eager["top1_error"], eager["top5_error"], 12)
        assert abs(got["loss"] - eager["loss"]) < 1e-4
    # the weights as the first argument (like predict and export) or as --checkpoint; the engine is named
    assert main(["evaluate", str(path), "--data-dir", data, "--workers", "0", "--engine", "folded"]) == 0
    assert "(folded engine)" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(path), "--data-dir", data, "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12


@pytest.mark.slow
def test_evaluate_applies_the_runs_recorded_tta_and_reproduces_its_error(tmp_path, capsys):
    import csv

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from densenet.models.weights import METADATA_KEY
    from densenet.training.train import train
    from tests.helpers import TINY_MODEL, make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=6, size=32)
    run = tmp_path / "run"
    train(overrides={"model": TINY_MODEL, "dataset": "cifar10", "data_dir": str(data), "epochs": 1, "batch_size": 4,
                     "device": "cpu", "quiet": True, "out": str(run), "tta": "flip-shift", "compile": "off",
                     "channels_last": False, "amp": "none"})
    reported = float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["test_error"])
    result = evaluate_weights(str(run), data_dir=str(data), workers=0, device="cpu", engine="eager")
    assert (result["tta"], result["tta_source"]) == ("flip-shift", "the weights' metadata")
    assert result["top1_error"] == pytest.approx(reported, abs=1e-3)
    one_view = evaluate_weights(str(run), data_dir=str(data), workers=0, device="cpu", engine="eager", tta="none")
    assert (one_view["tta"], one_view["tta_source"]) == ("none", "given")

    # Weights saved before the metadata held the TTA: config.yaml beside them says it.
    weights = run / "model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata[METADATA_KEY])
    assert meta.pop("tta") == "flip-shift"
    save_file(load_file(weights), weights, metadata={**metadata, METADATA_KEY: json.dumps(meta)})
    assert main(["evaluate", str(weights), "--data-dir", str(data), "--workers", "0", "--device", "cpu",
                 "--engine", "eager"]) == 0
    out, err = capsys.readouterr()
    assert "test-time augmentation flip-shift" in err and "config.yaml" in err
    assert f"top-1 error {reported:.2f}%" in out and "6 views averaged" in out
