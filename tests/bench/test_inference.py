"""``densenet bench inference`` on tiny data made here: every engine gets a top-1, an agreement, a build time."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import densenet
from densenet.cli import main
from densenet.inference import auto_order
from densenet.models.weights import save_weights
from tests.data import formats

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _tree(root, per_class):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                # a class-coloured image, so that a model can tell the classes apart
                pixels = np.full((32, 32, 3), 20 * label, dtype=np.uint8) + rng.integers(0, 10, (32, 32, 3),
                                                                                           dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")


def _weights(tmp_path, classes, dataset):
    torch.manual_seed(0)
    model = densenet.create_model("densenet_bc16_k4", num_classes=len(classes))
    weights = tmp_path / "model.safetensors"
    save_weights(model, weights, dict(model="densenet_bc16_k4", classes=classes, mean=[0.5] * 3, std=[0.25] * 3,
                                      input_size=32, dataset=dataset))
    return weights


@pytest.mark.slow
def test_bench_inference_reports_each_engine(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _tree(tmp_path / "cifar10", per_class=2)
    weights = _weights(tmp_path, CLASSES, "cifar10")
    code = main(["bench", "inference", str(weights), "--data", str(tmp_path / "cifar10"),
                 "--engines", "folded", "onnxruntime-int8", "--calibration-images", "8", "--batch-size", "4",
                 "--latency-images", "3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_images"] == 20 and report["auto"] in ("eager", *auto_order(torch.device("cpu")))
    assert len(report["matmul_peak_gflops"]) == 2 and min(report["matmul_peak_gflops"]) > 0
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["torchvision eager fp32", "eager", "folded", "onnxruntime-int8"]
    rows = {r["engine"]: r for r in report["results"]}
    assert rows["folded"]["top1"] == rows["eager"]["top1"] == rows["torchvision eager fp32"]["top1"]
    assert rows["folded"]["agrees_with_eager"] == 100.0 and rows["folded"]["max_logit_difference"] < 1e-4
    assert all(0 <= r["top1"] <= 100 and r["images_per_s"] > 0 and r["latency_ms"] > 0 for r in rows.values())
    assert rows["onnxruntime-int8"]["build_seconds"] > 0 and not rows["onnxruntime-int8"]["from_cache"]
    assert rows["torchvision eager fp32"]["speedup"] == 1.0


@pytest.mark.slow
def test_bench_inference_on_a_streamed_folder_and_a_named_network(tmp_path, capsys):
    # streamed data sets hold no tensor of images: the bench decodes them (it used to read test.images)
    formats.write_class_folders(tmp_path / "data" / "val", ["a", "b", "c"], 2, size=(40, 36), ext=".jpg")
    weights = _weights(tmp_path, ["a", "b", "c"], "folder")
    assert main(["bench", "inference", str(weights), "--dataset", "folder", "--data", str(tmp_path / "data"),
                 "--input-size", "32", "--engines", "folded", "--latency-images", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_images"] == 6 and report["input_size"] == 32
    assert [r["engine"] for r in report["results"]] == ["torchvision eager fp32", "eager", "folded"]
    # a named network with random weights, the images resized for it
    assert main(["bench", "inference", "--model", "densenet_bc16_k4", "--dataset", "folder", "--data",
                 str(tmp_path / "data"), "--input-size", "24", "--engines", "folded", "--latency-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "at 24 px" in out and "| folded | " in out
    default = out.split("the default engine (auto, of predict and evaluate) runs ")[1].split()[0]
    assert default in ("eager", *auto_order(torch.device("cpu")))
    assert "GFLOP/s before and after timing" in out


def test_bench_inference_class_mismatch_is_a_clear_error(tmp_path, capsys):
    _tree(tmp_path / "cifar10", per_class=1)
    weights = _weights(tmp_path, ["a", "b", "c"], "x")
    assert main(["bench", "inference", "--weights", str(weights), "--dataset", "cifar10",
                 "--data", str(tmp_path / "cifar10")]) == 2
    assert "3 classes" in capsys.readouterr().err
