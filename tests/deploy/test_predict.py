"""densenet predict on a tiny trained model: image modes, --json, folders, the preprocessing, bad files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.cli import main
from densenet.data.augment import normalize
from densenet.deploy.predict import Preprocess, find_images
from tests.deploy.trained import digit_images, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model, metadata = train_tiny(folder)
    return folder, model, metadata


def write_modes(folder, digit: np.ndarray) -> dict[str, object]:
    """One 8x8 digit (uint8) as grayscale, RGBA, palette and 16-bit PNG files; the pixels the model should see."""
    files = {}
    Image.fromarray(digit).save(folder / "gray.png")
    files["gray.png"] = digit
    rgba = np.stack([digit] * 3 + [np.full_like(digit, 255)], axis=-1)  # opaque: the same gray pixels
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    files["rgba.png"] = digit
    Image.fromarray(digit).convert("P").save(folder / "palette.png")
    files["palette.png"] = digit
    Image.fromarray(digit.astype(np.uint16) * 257).save(folder / "deep16.png")  # 16-bit: v * 257 -> v
    files["deep16.png"] = digit
    assert Image.open(folder / "deep16.png").mode.startswith("I") and Image.open(folder / "palette.png").mode == "P"
    return files


def test_json_output_for_every_image_mode_matches_the_evaluation_preprocessing(run, tmp_path, capsys):
    folder, model, metadata = run
    images, _ = digit_images(1)
    expected_pixels = write_modes(tmp_path, images[0, 0].numpy())
    paths = [str(tmp_path / name) for name in expected_pixels]
    assert main(["predict", str(folder), *paths, "--json", "--top-k", "3", "--engine", "eager"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    with torch.no_grad():  # what `densenet evaluate` computes for the same scan: uint8 -> /255 -> mean/std
        reference = torch.softmax(model(normalize(images, metadata["mean"], metadata["std"])), 1)[0]
    top3 = reference.topk(3)
    for line, path in zip(lines, paths, strict=True):
        record = json.loads(line)
        assert record["image"] == path
        got = record["predictions"]
        assert [p["index"] for p in got] == top3.indices.tolist()
        assert [p["class"] for p in got] == [metadata["classes"][i] for i in top3.indices.tolist()]
        np.testing.assert_allclose([p["probability"] for p in got], top3.values.numpy(), rtol=1e-5, atol=1e-6)


def test_text_output_folders_and_resizing(run, tmp_path, capsys):
    folder, model, metadata = run
    images, labels = digit_images(6)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i in range(6):  # larger than the model's 8x8 input: plain (bicubic) resize for a small-image data set
        Image.fromarray(images[i, 0].numpy()).resize((24, 24), resample=Image.NEAREST).save(
            tmp_path / ("a/b" if i % 2 else "a") / f"digit{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image, and not picked up from a folder")
    assert main(["predict", str(folder / "model.safetensors"), str(tmp_path / "a"), "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 * 3 and sum(line.endswith(".png") for line in out) == 6
    probabilities = [float(line.split()[0]) for line in out if not line.endswith(".png")]
    assert all(0 <= p <= 1 for p in probabilities)
    assert all(probabilities[i] >= probabilities[i + 1] for i in range(0, len(probabilities), 2))


def test_preprocess_follows_the_metadata():
    base = {"config": {"in_chans": 3, "stem": "imagenet"}, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    imagenet = Preprocess.from_metadata({**base, "input_size": 16, "dataset": "folder"})
    cifar = Preprocess.from_metadata({**base, "input_size": 16, "dataset": "cifar10"})
    assert imagenet.centre_crop and not cifar.centre_crop and not imagenet.grayscale
    gray = Preprocess.from_metadata({"config": {"in_chans": 1, "stem": "cifar"}, "mean": [0.3], "std": [0.4],
                                     "input_size": 8, "dataset": "digits"})
    assert gray.grayscale and gray.mean == (0.3,)


def test_centre_crop_for_imagenet_style_models(tmp_path):
    # Left half black, right half white, 64x32: resize short side to 18 (16 * 256/224), centre crop 16.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    meta = {"config": {"in_chans": 3, "stem": "imagenet"}, "mean": [0.0] * 3, "std": [1.0] * 3, "input_size": 16,
            "dataset": "folder"}
    crop = Preprocess.from_metadata(meta)(tmp_path / "wide.png")
    squash = Preprocess.from_metadata({**meta, "dataset": "cifar10"})(tmp_path / "wide.png")
    assert crop.shape == squash.shape == (3, 16, 16)
    # The crop keeps the middle 16 of 36 columns (short side 18): still half black, half white.
    assert crop[:, :, 0].max() < 0.05 and crop[:, :, -1].min() > 0.95
    assert abs(float(crop.mean()) - 0.5) < 0.05


@pytest.mark.parametrize("content", [b"", b"this is text, not a PNG", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"])
def test_a_broken_image_is_one_line_naming_the_file_and_the_others_keep_their_results(run, tmp_path, capsys,
                                                                                        content):
    folder, _, _ = run
    good = tmp_path / "good.png"
    Image.fromarray(digit_images(1)[0][0, 0].numpy()).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    assert main(["predict", str(folder), str(bad), str(good), "--engine", "eager"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == str(good) and len(captured.out.splitlines()) == 1 + 5  # top 5
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and errors[0].startswith("densenet predict: error:")
    assert captured.err.rstrip().endswith(errors[0])  # listed at the end, after the results
    assert "Traceback" not in captured.err


def test_missing_files_weights_and_options(run, tmp_path, capsys):
    folder, _, _ = run
    assert main(["predict", str(folder), str(tmp_path / "nowhere.png")]) == 2
    assert str(tmp_path / "nowhere.png") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(folder), str(tmp_path / "empty")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    assert main(["predict", str(tmp_path / "no-weights"), str(image)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(folder), str(image), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert find_images([image, tmp_path]) == [image, image]  # a file given and the same file in a folder


def test_top_k_larger_than_the_classes_is_capped(run, tmp_path, capsys):
    folder, _, _ = run
    Image.new("L", (8, 8)).save(tmp_path / "blank.png")
    assert main(["predict", str(folder), str(tmp_path / "blank.png"), "--top-k", "50", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["predictions"]) == 10
    assert abs(sum(p["probability"] for p in record["predictions"]) - 1) < 1e-5


def _digit_files(folder, n):
    images, _ = digit_images(n)
    paths = []
    for i in range(n):
        path = folder / f"digit{i}.png"
        Image.fromarray(images[i, 0].numpy()).save(path)
        paths.append(str(path))
    return paths


def _records(capsys):
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.strip().splitlines()], captured.err


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["folded", "onnxruntime", "openvino"])
def test_each_fp32_engine_predicts_what_eager_predicts(run, tmp_path, capsys, engine):
    if engine in ("onnxruntime", "openvino"):
        pytest.importorskip(engine)
    folder, _, _ = run
    paths = _digit_files(tmp_path, 5)
    assert main(["predict", str(folder), *paths, "--json", "--top-k", "3", "--batch-size", "2", "--engine",
                 "eager"]) == 0
    eager, err = _records(capsys)
    assert "engine eager" in err
    assert main(["predict", str(folder), *paths, "--json", "--top-k", "3", "--batch-size", "2", "--engine",
                 engine]) == 0
    got, err = _records(capsys)
    assert f"engine {engine}" in err
    for mine, theirs in zip(got, eager, strict=True):
        assert [p["index"] for p in mine["predictions"]] == [p["index"] for p in theirs["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in mine["predictions"]],
                                   [p["probability"] for p in theirs["predictions"]], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [True, False], ids=["native-bf16", "no-bf16"])
def test_the_default_engine_is_the_fastest_for_the_cpu_and_says_so(run, tmp_path, capsys, monkeypatch, bf16):
    from densenet.inference import engines

    monkeypatch.setattr(engines, "native_bf16", lambda device: bf16)
    folder, _, _ = run
    paths = _digit_files(tmp_path, 5)
    assert main(["predict", str(folder), *paths, "--json", "--top-k", "3", "--engine", "eager"]) == 0
    eager, _ = _records(capsys)
    assert main(["predict", str(folder), *paths, "--json", "--top-k", "3", "--batch-size", "4"]) == 0
    got, err = _records(capsys)
    chosen = next(e for e in engines.auto_order(torch.device("cpu")) if not engines.missing_package(e))
    assert chosen == ("openvino-bf16" if bf16 else "openvino") or engines.missing_package("openvino")
    assert err.startswith(f"densenet predict: engine {chosen} (built in ")
    for mine, theirs in zip(got, eager, strict=True):  # bf16: the same class, probabilities to about 1%
        assert mine["predictions"][0]["index"] == theirs["predictions"][0]["index"]
        np.testing.assert_allclose(mine["predictions"][0]["probability"], theirs["predictions"][0]["probability"],
                                   atol=2e-2 if chosen == "openvino-bf16" else 1e-5)


def test_the_default_engine_falls_back_and_says_which_ran(run, tmp_path, capsys, monkeypatch):
    import sys

    folder, _, _ = run
    paths = _digit_files(tmp_path, 2)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if neither optional runtime were installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["predict", str(folder), *paths, "--json"]) == 0
    records, err = _records(capsys)
    assert len(records) == 2
    assert "engine eager" in err and "openvino" in err and "ran eager" in err
