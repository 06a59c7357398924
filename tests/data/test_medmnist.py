"""MedMNIST .npz files: 2D grayscale and colour, multi-label and 3D, written by the tests in the real layout;
malformed files; the real files in ../shared/data when present."""

from pathlib import Path

import numpy as np
import pytest
import torch

from densenet.data.datasets import load_data
from densenet.data.task import Task
from densenet.errors import ConfigError
from tests.data import formats

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist"


def test_grayscale_binary_with_its_three_splits_and_known_names(tmp_path):
    made = formats.write_medmnist(tmp_path / "pneumoniamnist.npz", counts=(6, 3, 4))
    data = load_data("medmnist", tmp_path / "pneumoniamnist.npz")
    assert data.task == Task("binary", ("normal", "pneumonia")) and data.task.num_outputs == 1
    assert data.classes == ["normal", "pneumonia"] and data.in_chans == 1 and data.spatial_dims == 2
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 4)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (6, 1, 8, 8)
    assert torch.equal(data.val.images[:, 0], torch.from_numpy(made["val_images"]))
    assert data.test.labels.dtype == torch.int64 and data.test.labels.tolist() == [0, 1, 0, 1]
    x = made["train_images"] / 255.0
    assert data.mean == [round(float(x.mean()), 4)] and data.std == [round(float(x.std()), 4)]
    assert data.input_size == 8 and data.in_memory


def test_colour_multiclass_is_channels_first_and_named_by_index(tmp_path):
    made = formats.write_medmnist(tmp_path / "bloodmnist_64.npz", image_shape=(8, 8, 3), labels="multiclass",
                                  classes=4, counts=(8, 4, 4))
    data = load_data("medmnist", tmp_path / "bloodmnist_64.npz")
    assert data.task == Task("multiclass", ("0", "1", "2", "3")) and data.in_chans == 3
    assert torch.equal(data.train.images, torch.from_numpy(made["train_images"].transpose(0, 3, 1, 2)))
    assert len(data.mean) == 3


def test_multilabel_labels_are_float_rows(tmp_path):
    made = formats.write_medmnist(tmp_path / "chestmnist.npz", labels="multilabel", classes=14)
    data = load_data("medmnist", tmp_path / "chestmnist.npz")
    assert data.task.kind == "multilabel" and data.task.names[:2] == ("atelectasis", "cardiomegaly")
    assert data.train.labels.dtype == torch.float32 and data.train.labels.shape == (6, 14)
    assert torch.equal(data.train.labels, torch.from_numpy(made["train_labels"]).float())
    other = formats.write_medmnist(tmp_path / "mine.npz", labels="multilabel", classes=3)
    assert load_data("medmnist", tmp_path / "mine.npz").task == Task("multilabel", ("0", "1", "2"))
    assert other["test_labels"].shape == (4, 3)


def test_volumes_get_a_channel_and_three_spatial_dims(tmp_path):
    made = formats.write_medmnist(tmp_path / "adrenalmnist3d.npz", image_shape=(6, 6, 6))
    data = load_data("medmnist", tmp_path / "adrenalmnist3d.npz")
    assert data.spatial_dims == 3 and data.in_chans == 1 and data.input_size == 6
    assert data.train.images.shape == (6, 1, 6, 6, 6)
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(made["test_images"]))
    assert data.task == Task("binary", ("normal", "mass"))


def test_evaluation_load_leaves_out_train_but_keeps_its_statistics(tmp_path):
    formats.write_medmnist(tmp_path / "x.npz")
    full, test_only = load_data("medmnist", tmp_path / "x.npz"), load_data("medmnist", tmp_path / "x.npz", train=False)
    assert test_only.train is None and (test_only.mean, test_only.std) == (full.mean, full.std)
    with pytest.raises(ConfigError, match="x_64.npz"):
        load_data("medmnist", tmp_path / "x.npz", input_size=64)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"val_labels": None}, "missing key val_labels"),
    ({"test_labels": np.zeros((3, 1), dtype=np.uint8)}, r"test_labels has shape \(3, 1\) for 4 images"),
    ({"train_images": np.zeros((6, 8), dtype=np.uint8)}, "train_images has shape"),
    ({"val_images": np.zeros((3, 9, 9), dtype=np.uint8)}, "val_images are"),
    ({"train_images": np.zeros((6, 8, 8), dtype=np.float32)}, "train_images is float32"),
    ({"train_labels": np.array([[0], [1], [2], [0], [1], [-1]])}, ">= 0"),
    ({"test_labels": np.zeros((4, 2), dtype=np.uint8)}, "disagree on the number of columns"),
])
def test_malformed_files_name_the_file_and_the_key(tmp_path, overrides, message):
    path = tmp_path / "bad.npz"
    formats.write_medmnist(path, **overrides)
    with pytest.raises(ConfigError, match=message) as caught:
        load_data("medmnist", path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_not_an_npz_is_one_line(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not numpy")
    array = tmp_path / "one.npy"
    np.save(array, np.zeros(3))
    for path, message in ((text, "not a readable MedMNIST .npz"), (array, "single .npy array"),
                          (tmp_path / "absent.npz", "no such file")):
        with pytest.raises(ConfigError, match=message):
            load_data("medmnist", path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "counts", "shape", "positives"), [
    ("pneumoniamnist.npz", (4708, 524, 624), (1, 28, 28), (3494, 389, 390)),
    ("adrenalmnist3d.npz", (1188, 98, 298), (1, 28, 28, 28), (259, 22, 69)),
    ("adrenalmnist3d_64.npz", (1188, 98, 298), (1, 64, 64, 64), (259, 22, 69)),
])
def test_real_medmnist_files(name, counts, shape, positives):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    data = load_data("medmnist", path)
    splits = (data.train, data.val, data.test)
    assert tuple(len(s) for s in splits) == counts
    assert tuple(data.train.images.shape[1:]) == shape and data.task.kind == "binary"
    assert tuple(int(s.labels.sum()) for s in splits) == positives  # the README's class counts
    assert data.spatial_dims == len(shape) - 1
