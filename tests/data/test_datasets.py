import numpy as np
import pytest
import torch

from densenet.data import datasets
from densenet.data.datasets import load_data, worker_error_message
from densenet.data.registry import dataset_record
from densenet.errors import ConfigError, DenseNetError
from tests.data import formats


def assert_matches_record(data):
    """A loaded data set agrees with what its record (densenet.data.registry) says before loading it."""
    record = dataset_record(data.name)
    assert (data.in_chans, data.input_size, data.in_memory) == (record.in_chans, record.input_size, record.in_memory)
    assert record.num_classes in (None, data.num_classes)
    if record.mean is not None:
        assert (data.mean, data.std) == (list(record.mean), list(record.std))


def test_digits_is_a_stratified_20_percent_split():
    data = load_data("digits")
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 8, 8)
    counts = torch.bincount(data.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert data.in_chans == 1 and data.num_classes == 10
    assert_matches_record(data)


def test_cifar10_official_pickles(tmp_path):
    made = formats.write_cifar10(tmp_path)
    data = load_data("cifar10", tmp_path)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert torch.equal(data.train.images, torch.from_numpy(made["train_x"]))
    assert torch.equal(data.train.labels, torch.from_numpy(made["train_y"]))
    assert torch.equal(data.test.images, torch.from_numpy(made["test_x"]))
    assert data.in_memory
    assert_matches_record(data)
    assert 0.4 < data.mean[0] < 0.6  # computed from the (uniform random) training images


def test_cifar100_official_pickles(tmp_path):
    made = formats.write_cifar100(tmp_path)
    data = load_data("cifar100", tmp_path)
    assert data.num_classes == 100 and data.classes[7] == "class07"
    assert torch.equal(data.train.labels, torch.from_numpy(made["train_y"]))
    assert data.test.images.shape == (4, 3, 32, 32)


def test_cifar_missing_or_incomplete_says_what_to_put_where(tmp_path):
    with pytest.raises(DenseNetError, match="cifar-10-batches-py"):
        load_data("cifar10", tmp_path / "nothing")
    formats.write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DenseNetError, match="incomplete: missing data_batch_3"):
        load_data("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DenseNetError, match="data_batch_3"):
        load_data("cifar10", tmp_path)


def test_cifar_image_folder_layout_is_decoded_once_and_cached(tmp_path, monkeypatch):
    classes = ["airplane", "automobile", "bird"]
    train = formats.write_class_folders(tmp_path / "cifar10" / "train", classes, 3, seed=1)
    formats.write_class_folders(tmp_path / "cifar10" / "test", classes, 2, seed=2)
    data = load_data("cifar10", tmp_path)  # finds cifar10/train below the folder given, as the tarball unpacks
    assert data.classes == classes and len(data.train) == 9 and len(data.test) == 6
    first = sorted(train)[0]  # airplane/0000.png
    assert torch.equal(data.train.images[0], torch.from_numpy(train[first].transpose(2, 0, 1)))
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(datasets.folders, "load_image", no_decoding)
    again = load_data("cifar10", tmp_path / "cifar10")
    assert torch.equal(again.train.images, data.train.images)
    monkeypatch.undo()
    formats.write_class_folders(tmp_path / "cifar10" / "train", ["bird"], 4, seed=5)  # a changed file: rebuilt
    assert len(load_data("cifar10", tmp_path).train) == 10


def test_corrupt_image_is_named(tmp_path):
    formats.write_class_folders(tmp_path / "train", ["a", "b"], 2)
    formats.write_class_folders(tmp_path / "test", ["a", "b"], 1)
    bad = tmp_path / "train" / "b" / "0001.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DenseNetError, match=str(bad)):
        load_data("cifar10", tmp_path)


def test_svhn_train_plus_extra_with_6000_style_holdout(tmp_path):
    made = formats.write_svhn(tmp_path, {"train": 60, "extra": 50, "test": 20})
    data = load_data("svhn", tmp_path)
    assert len(data.train) + len(data.val) == 110
    # 400 per class from train and 200 from extra, capped at a fifth of each class here (6 and 5 per class)
    assert len(data.val) == 10 + 10 and torch.bincount(data.val.labels).tolist() == [2] * 10
    assert data.test.labels.tolist() == list(made["test"][1])  # label 10 became 0
    assert torch.equal(data.test.images, torch.from_numpy(made["test"][0]))
    assert data.mean == [0.0] * 3 and data.std == [1.0] * 3  # the paper: pixels / 255 only
    assert_matches_record(data)
    assert load_data("svhn", tmp_path, train=False).train is None


def test_svhn_missing_extra(tmp_path):
    formats.write_svhn(tmp_path, {"train": 20, "test": 10})
    with pytest.raises(DenseNetError, match="extra_32x32.mat not found"):
        load_data("svhn", tmp_path)
    (tmp_path / "extra_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DenseNetError, match="extra_32x32.mat"):
        load_data("svhn", tmp_path)


def test_imagenet_folders_stream_with_single_and_ten_crop(tmp_path):
    formats.write_class_folders(tmp_path / "train", ["n01", "n02"], 2, size=(40, 30), ext=".jpg")
    formats.write_class_folders(tmp_path / "val", ["n01", "n02"], 1, size=(30, 40), ext=".jpg")
    data = load_data("imagenet", tmp_path, input_size=16)
    assert not data.in_memory and data.classes == ["n01", "n02"]
    x, y = data.train[3]
    assert x.shape == (3, 16, 16) and y == 1
    x, _ = data.test[0]
    assert x.shape == (3, 16, 16)
    ten = load_data("imagenet", tmp_path, input_size=16, ten_crop=True, train=False)
    assert ten.test[1][0].shape == (10, 3, 16, 16)
    with pytest.raises(DenseNetError, match="val/"):
        load_data("imagenet", tmp_path / "train")


def test_folder_accepts_test_instead_of_val_and_checks_classes(tmp_path):
    formats.write_class_folders(tmp_path / "train", ["cat", "dog"], 2, size=(20, 20))
    formats.write_class_folders(tmp_path / "test", ["dog"], 2, size=(20, 20))
    data = load_data("folder", tmp_path, input_size=8)
    assert [label for _, label in data.test.samples] == [1, 1]  # the training set's label order
    formats.write_class_folders(tmp_path / "test", ["emu"], 1, size=(20, 20))
    with pytest.raises(DenseNetError, match="emu"):
        load_data("folder", tmp_path, input_size=8)


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean cifar10"):
        load_data("cifar-10")


def test_worker_error_keeps_the_file_name(tmp_path):
    formats.write_class_folders(tmp_path / "train", ["a"], 1)
    formats.write_class_folders(tmp_path / "val", ["a"], 1)
    (tmp_path / "val" / "a" / "0000.png").write_bytes(b"")
    data = load_data("folder", tmp_path, input_size=8)
    loader = torch.utils.data.DataLoader(data.test, batch_size=1, num_workers=1)
    with pytest.raises(DenseNetError) as info:
        next(iter(loader))
    message = worker_error_message(info.value)
    assert message.startswith("cannot read image") and "0000.png" in message and "\n" not in message
    assert np.asarray(data.train[0][0]).shape == (3, 8, 8)
