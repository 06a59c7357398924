"""``densenet bench inference`` on a tiny CIFAR-shaped JPEG tree made here: every engine gets a top-1 and a speed."""

import json

import numpy as np
import torch
from PIL import Image

import densenet
from densenet.cli import main
from densenet.models.weights import save_weights

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


def test_bench_inference_reports_each_engine(tmp_path, capsys):
    _tree(tmp_path / "cifar10", per_class=2)
    torch.manual_seed(0)
    model = densenet.create_model("densenet_bc16_k4")
    weights = tmp_path / "model.safetensors"
    save_weights(model, weights, dict(model="densenet_bc16_k4", classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3,
                                      input_size=32, dataset="cifar10"))
    code = main(["bench", "inference", "--weights", str(weights), "--data", str(tmp_path / "cifar10"),
                 "--engines", "folded", "onnxruntime-int8", "--calibration-images", "8", "--batch-size", "4",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_images"] == 20
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["baseline (eager fp32)", "torchvision eager fp32", "folded", "onnxruntime-int8"]
    top1 = {r["engine"]: r["top1"] for r in report["results"]}
    assert top1["folded"] == top1["baseline (eager fp32)"] == top1["torchvision eager fp32"]
    assert all(0 <= r["top1"] <= 100 and r["images_per_s"] > 0 for r in report["results"])
    assert report["results"][0]["speedup"] == 1.0


def test_bench_inference_class_mismatch_is_a_clear_error(tmp_path, capsys):
    _tree(tmp_path / "cifar10", per_class=1)
    model = densenet.create_model("densenet_bc16_k4", num_classes=3)
    weights = tmp_path / "model.safetensors"
    save_weights(model, weights, dict(model="densenet_bc16_k4", classes=["a", "b", "c"], mean=[0.5] * 3,
                                      std=[0.25] * 3, input_size=32, dataset="x"))
    assert main(["bench", "inference", "--weights", str(weights), "--data", str(tmp_path / "cifar10")]) == 2
    assert "3 classes" in capsys.readouterr().err
