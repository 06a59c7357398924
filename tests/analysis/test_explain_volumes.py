"""densenet explain on .npy volumes for a model trained on volumes: the slice sheets, and one-line refusals."""

import numpy as np
import pytest
from PIL import Image

from densenet.analysis.explain import explain_batch
from densenet.data.datasets import load_data
from densenet.data.labelled import read_volume
from densenet.deploy.predict import Preprocess
from densenet.models.registry import create_model
from densenet.models.weights import load_weights, save_weights
from tests.deploy.test_predict_volumes import csv_volumes, save_run, tiny_3d
from tests.helpers import assert_user_error, run_cli


@pytest.fixture
def volume_run(tmp_path):
    files = csv_volumes(tmp_path / "data")
    save_run(tmp_path / "run", tiny_3d(num_classes=1), load_data("csv", tmp_path / "data", input_size=8))
    return tmp_path / "run", files


@pytest.mark.slow
def test_explain_writes_a_slice_grid_per_volume_and_a_sheet(volume_run, tmp_path, capsys):
    run, files = volume_run
    code, out, err = run_cli(capsys, "explain", run, files[0], tmp_path / "data" / "images", "--out",
                             tmp_path / "maps", "--sheet", "--batch-size", "4")
    assert code == 0, err
    names = ["case0.cam.png", "case0-2.cam.png"] + [f"case{i}.cam.png" for i in range(1, 6)] + ["sheet.cam.png"]
    assert out.split() == [str(tmp_path / "maps" / n) for n in names]
    assert "CAM of the predicted label for 7 image(s)" in err
    with Image.open(tmp_path / "maps" / "case0.cam.png") as grid:
        assert grid.format == "PNG" and grid.size[0] >= 3 * 1.8 * 100 - 1  # 8 slices: a 3 x 3 grid of tiles


def test_the_maps_are_of_the_volume_predict_prepares(volume_run):
    """What the command hands the library: predict's (1, 8, 8, 8) tensor, scores upsampled to the input's size."""
    run, files = volume_run
    model, metadata = load_weights(run)
    volume = Preprocess.from_metadata(metadata)(files[0])
    (e,) = explain_batch(model, volume[None], metadata, names=[str(files[0])])
    assert volume.shape == (1, 8, 8, 8) and e.scores.shape == (8, 8, 8) and e.pixels.shape == (1, 8, 8, 8)
    resized = read_volume(files[0], 8)  # 6x7x8 on disk: drawn as the training loader resizes it
    np.testing.assert_allclose(e.pixels[0], resized / 255.0, atol=1e-5)
    assert e.label == "mass" and 0 < e.probability < 1


def test_explain_refuses_what_the_model_cannot_take_in_one_line(volume_run, tmp_path, capsys):
    run, files = volume_run
    Image.new("L", (8, 8)).save(tmp_path / "slice.png")
    np.save(tmp_path / "rgb.npy", np.zeros((3, 8, 8, 8), np.uint8))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    for path, needle in ((tmp_path / "slice.png", "an image file, and this model takes 3D volumes as .npy"),
                         (tmp_path / "rgb.npy", "has shape (3, 8, 8, 8); a volume is (D, H, W) or (1, D, H, W)"),
                         (tmp_path / "junk.npy", "no NumPy .npy header")):
        code, _, err = run_cli(capsys, "explain", run, path, "--out", tmp_path / "out")
        assert_user_error(code, err, "explain", str(path), needle)
        assert not (tmp_path / "out").exists()
    flat = create_model("densenet_bc16_k4", num_classes=2, in_chans=1).eval()
    save_weights(flat, tmp_path / "flat.safetensors", {"classes": ["a", "b"], "mean": [0.5], "std": [0.25],
                                                       "input_size": 8, "dataset": "digits"})
    code, _, err = run_cli(capsys, "explain", tmp_path / "flat.safetensors", files[0], "--out", tmp_path / "out")
    assert_user_error(code, err, "explain", str(files[0]), "a .npy array, and this model takes 2D images")
    code, _, err = run_cli(capsys, "explain", run, tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_user_error(code, err, "explain", "no such file or folder")
    assert not (tmp_path / "out").exists()
