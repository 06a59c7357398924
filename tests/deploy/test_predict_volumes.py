"""densenet predict on .npy volumes for a model trained on volumes (spatial_dims 3): the probabilities are the
model's on the volume as evaluation loads and normalises it; folders, --json, and one-line refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from densenet.data.augment import normalize
from densenet.data.datasets import load_data
from densenet.deploy.predict import Preprocess, predict
from densenet.models.densenet import DenseNet
from densenet.models.registry import create_model
from densenet.models.weights import save_weights
from tests.data import formats
from tests.helpers import assert_user_error, run_cli

VOLUME = (6, 7, 8)  # the volumes on disk; the model's input_size is 8: resized to 8^3 as evaluation does


def tiny_3d(num_classes: int, in_chans: int = 1, seed: int = 0) -> DenseNet:
    """A two-block 3D DenseNet-BC, with BN statistics and classifier far from their initial values, so that a
    wrong scale or mean/std moves its probabilities."""
    torch.manual_seed(seed)
    model = DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, stem="cifar", spatial_dims=3,
                     in_chans=in_chans, num_classes=num_classes).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.2, 1.0)
            elif isinstance(module, nn.Linear):
                module.weight.mul_(20.0)
    return model


def save_run(folder: Path, model: DenseNet, data, **extra) -> dict:
    """FOLDER/model.safetensors with the metadata training writes (``training.train._metadata``) for ``data``."""
    metadata = {"model": "densenet_tiny3d", "classes": list(data.classes), "mean": list(data.mean),
                "std": list(data.std), "input_size": int(data.input_size), "dataset": data.name,
                "memory_efficient": False, "tta": "none", "task": data.task.to_dict(), **extra}
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "model.safetensors", metadata)
    return {**metadata, "config": dict(model.config)}


def csv_volumes(folder: Path) -> list[Path]:
    """A CSV set of six float32 (1, D, H, W) volumes in 0..1 (binary 'mass'), as ``densenet train --dataset csv``
    reads it; the volume files, in order."""
    names = [f"case{i}.npy" for i in range(6)]
    volumes = formats.write_volumes(folder, names, shape=VOLUME, dtype=np.float32)
    for name, volume in volumes.items():  # (1, D, H, W): the channel axis the loader also accepts
        np.save(folder / "images" / name, volume[None])
    formats.write_csv(folder / "labels.csv", ["filename", "mass", "split"],
                      [[n, i % 2, ["train", "train", "train", "val", "test", "test"][i]] for i, n in enumerate(names)])
    return [folder / "images" / n for n in names]


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """A binary 3D model 'trained' on the CSV set with --input-size 8: (run folder, model, metadata, files)."""
    root = tmp_path_factory.mktemp("volumes")
    files = csv_volumes(root / "data")
    data = load_data("csv", root / "data", input_size=8)
    model = tiny_3d(num_classes=1)
    metadata = save_run(root / "run", model, data)
    return root / "run", model, metadata, files


def probabilities(capsys, *argv) -> dict[str, dict]:
    code, out, err = run_cli(capsys, "predict", *argv, "--json", "--engine", "eager")
    assert code == 0, err
    return {record["image"]: record for record in map(json.loads, out.splitlines())}


def test_a_volume_gets_the_probability_of_evaluation_preprocessing(binary, capsys):
    """The oracle: `densenet evaluate`'s path (the CSV loader at the weights' input_size, then the metadata's
    mean and std) on the test rows, through the model, against predict on the same two files."""
    run, model, metadata, files = binary
    data = load_data("csv", files[0].parents[1], train=False, input_size=metadata["input_size"],
                     names=metadata["task"]["names"])
    assert data.test.images.shape == (2, 1, 8, 8, 8) and metadata["mean"][0] > 0.3  # float 0..1, resized
    with torch.no_grad():
        expected = torch.sigmoid(model(normalize(data.test.images, metadata["mean"], metadata["std"])))[:, 0]
    assert float(expected.max() - expected.min()) > 1e-3  # the two volumes are told apart
    got = probabilities(capsys, run, *files[4:])
    assert list(got) == [str(f) for f in files[4:]]
    for path, p in zip(files[4:], expected.tolist(), strict=True):
        record = got[str(path)]
        assert record["task"] == "binary" and record["probabilities"]["mass"] == pytest.approx(p, rel=1e-5)
        assert record["class"] == ("mass" if p > 0.5 else "not mass")


def test_a_multiclass_medmnist_volume_gets_evaluations_softmax(tmp_path, capsys):
    """uint8 (D, H, W) volumes of a MedMNIST 3D file, a 3-class model: softmax of the evaluation's tensor."""
    arrays = formats.write_medmnist(tmp_path / "organmnist3d.npz", image_shape=(8, 8, 8), labels="multiclass",
                                    classes=3)
    data = load_data("medmnist", tmp_path / "organmnist3d.npz")
    model = tiny_3d(num_classes=3, seed=1)
    metadata = save_run(tmp_path / "run", model, data)
    files = []
    for i, volume in enumerate(arrays["test_images"][:2]):
        files.append(tmp_path / f"scan{i}.npy")
        np.save(files[-1], volume)
    with torch.no_grad():
        expected = torch.softmax(model(normalize(data.test.images[:2], metadata["mean"], metadata["std"])), 1)
    got = probabilities(capsys, tmp_path / "run", *files, "--top-k", "3")
    for path, row in zip(files, expected, strict=True):
        predictions = got[str(path)]["predictions"]
        assert [p["index"] for p in predictions] == row.argsort(descending=True).tolist()
        np.testing.assert_allclose([p["probability"] for p in predictions], row.sort(descending=True).values,
                                   rtol=1e-5, atol=1e-7)


def test_text_output_and_a_folder_searched_for_npy(binary, tmp_path, capsys):
    run, _, _, files = binary
    (tmp_path / "scans" / "more").mkdir(parents=True)
    np.save(tmp_path / "scans" / "b.npy", np.load(files[0]))
    np.save(tmp_path / "scans" / "more" / "a.npy", np.load(files[1]))
    Image.new("L", (8, 8)).save(tmp_path / "scans" / "slice.png")  # not a volume: a 3D model's folder skips it
    (tmp_path / "scans" / "notes.txt").write_text("skipped too")
    code, out, err = run_cli(capsys, "predict", run, tmp_path / "scans", files[2], "--engine", "eager")
    assert code == 0, err
    lines = out.splitlines()
    names = [str(tmp_path / "scans" / "b.npy"), str(tmp_path / "scans" / "more" / "a.npy"), str(files[2])]
    assert lines[0::3] == names  # the file, its probability, the decision
    assert all(line.strip().startswith("-> ") for line in lines[2::3])
    assert all("mass (threshold 0.5000)" in line for line in lines[1::3])


def test_unreadable_volumes_are_listed_at_the_end_and_the_others_keep_results(binary, tmp_path, capsys):
    run, _, _, files = binary
    Image.new("L", (8, 8)).save(tmp_path / "slice.png")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.uint8))
    np.save(tmp_path / "rgb.npy", np.zeros((3, 8, 8, 8), np.uint8))
    np.save(tmp_path / "hu.npy", np.full((8, 8, 8), -1000, np.int16))
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    with open(tmp_path / "archive.npy", "wb") as f:  # a .npz archive under a .npy name
        np.savez(f, a=np.zeros(3))
    bad = {"slice.png": "an image file, and this model takes 3D volumes as .npy files ((D, H, W) or (1, D, H, W)",
           "flat.npy": "has shape (8, 8); a volume is (D, H, W) or (1, D, H, W)",
           "rgb.npy": "has shape (3, 8, 8, 8); a volume is (D, H, W) or (1, D, H, W)",
           "hu.npy": "holds int16 values from -1000 to -1000; volumes are uint8 0..255 or floating point 0..1",
           "junk.npy": "as a .npy array (no NumPy .npy header)",
           "archive.npy": "a .npz archive holds several arrays"}
    paths = [tmp_path / name for name in bad]
    code, out, err = run_cli(capsys, "predict", run, files[0], *paths, "--engine", "eager")
    assert code == 1
    assert out.splitlines()[0] == str(files[0]) and len(out.splitlines()) == 3
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == len(bad) and err.rstrip().endswith(errors[-1]) and "Traceback" not in err
    for line, (name, needle) in zip(errors, bad.items(), strict=True):
        assert line.startswith("densenet predict: error: ") and str(tmp_path / name) in line and needle in line
    code, out, _ = run_cli(capsys, "predict", run, files[0], paths[0], "--json", "--engine", "eager")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and {r["image"]: "error" in r for r in records} == {str(paths[0]): True, str(files[0]): False}


def test_a_2d_model_refuses_npy_files_and_a_3d_model_an_empty_folder(binary, tmp_path, capsys):
    run, _, _, files = binary
    flat = create_model("densenet_bc16_k4", num_classes=2, in_chans=1).eval()
    save_weights(flat, tmp_path / "flat.safetensors", {"classes": ["a", "b"], "mean": [0.5], "std": [0.25],
                                                       "input_size": 8, "dataset": "digits"})
    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    code, out, err = run_cli(capsys, "predict", tmp_path / "flat.safetensors", files[0], tmp_path / "ok.png",
                             "--engine", "eager")
    assert code == 1 and out.splitlines()[0] == str(tmp_path / "ok.png")
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(files[0]) in errors[0]
    assert "a .npy array, and this model takes 2D images" in errors[0]
    (tmp_path / "volumes").mkdir()
    np.save(tmp_path / "volumes" / "v.npy", np.zeros((8, 8, 8), np.uint8))
    code, _, err = run_cli(capsys, "predict", tmp_path / "flat.safetensors", tmp_path / "volumes")
    assert_user_error(code, err, "predict", "holds no image files")
    (tmp_path / "pictures").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "pictures" / "p.png")
    code, _, err = run_cli(capsys, "predict", run, tmp_path / "pictures")
    assert_user_error(code, err, "predict", "holds no .npy volumes")
    code, _, err = run_cli(capsys, "predict", run, tmp_path / "nowhere.npy")
    assert_user_error(code, err, "predict", "nowhere.npy: no such file or folder")


def test_a_multichannel_3d_model_is_refused_in_one_line(tmp_path, capsys):
    save_weights(tiny_3d(num_classes=2, in_chans=2), tmp_path / "two.safetensors",
                 {"classes": ["a", "b"], "mean": [0.5, 0.5], "std": [0.2, 0.2], "input_size": 8})
    np.save(tmp_path / "v.npy", np.zeros((8, 8, 8), np.uint8))
    code, _, err = run_cli(capsys, "predict", tmp_path / "two.safetensors", tmp_path / "v.npy")
    assert_user_error(code, err, "predict", "this 3D model takes 2-channel volumes")


def test_weights_without_input_size_keep_each_volume_and_need_one_shape(tmp_path):
    metadata = {"config": dict(tiny_3d(num_classes=2).config), "mean": [0.5], "std": [0.25], "classes": ["a", "b"]}
    preprocess = Preprocess.from_metadata(metadata)
    assert preprocess.input_size is None and preprocess.spatial_dims == 3
    np.save(tmp_path / "a.npy", np.full((4, 5, 6), 255, np.uint8))
    np.save(tmp_path / "b.npy", np.zeros((1, 6, 6, 6), np.float32))
    x = preprocess(tmp_path / "a.npy")
    assert x.shape == (1, 4, 5, 6) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    results = {Path(r.image).name: r for r in predict(tiny_3d(num_classes=2), metadata,
                                                      [tmp_path / "a.npy", tmp_path / "b.npy"], engine="eager")}
    assert results["a.npy"].error is None and len(results["a.npy"].classes) == 2
    assert "b.npy: it is (6, 6, 6), the first (4, 5, 6); give --input-size" in results["b.npy"].error
    resized = Preprocess.from_metadata({**metadata, "input_size": 8})(tmp_path / "b.npy")
    assert resized.shape == (1, 8, 8, 8) and torch.allclose(resized, torch.full_like(resized, -2.0))
