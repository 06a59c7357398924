"""Images and .npy volumes labelled by a CSV, in both label styles, with a split column, a split file beside
or a seeded split; every bad input a ConfigError naming the file and the row; MIML when present."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet.data import folders, labelled
from densenet.data.datasets import load_data
from densenet.data.task import Task
from densenet.errors import ConfigError
from tests.data import formats

MIML = Path(__file__).resolve().parents[3] / "shared" / "data" / "miml" / "miml.tar"
NAMES = [f"{i}.png" for i in range(1, 11)]


def columns_set(tmp_path, gray=False):
    """MIML's layout: images/, labels.csv with 0/1 columns, split.csv beside."""
    pixels = formats.write_labelled_images(tmp_path, NAMES, size=8, gray=gray)
    rows = [[name, i % 2, int(i % 3 == 0), 0] for i, name in enumerate(NAMES)]
    formats.write_csv(tmp_path / "labels.csv", ["Filenames", "desert", "sea", "trees"], rows)
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    formats.write_csv(tmp_path / "split.csv", ["Filenames", "split"], [[n, s] for n, s in zip(NAMES, splits)])
    return pixels, rows


def test_zero_one_columns_with_a_split_file_beside(tmp_path):
    pixels, rows = columns_set(tmp_path)
    data = load_data("csv", tmp_path, input_size=8)  # the folder holding labels.csv
    assert data.task == Task("multilabel", ("desert", "sea", "trees")) and data.task.num_outputs == 3
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 2)
    assert data.train.labels.dtype == torch.float32
    assert data.train.labels.tolist() == [[float(v) for v in r[1:]] for r in rows[:6]]  # a row of zeros is allowed
    assert torch.equal(data.test.images[1], torch.from_numpy(pixels[NAMES[9]]))
    assert data.in_chans == 3 and data.input_size == 8 and data.spatial_dims == 2 and data.assignment is None


def test_label_lists_with_a_split_column_and_no_finding(tmp_path):
    formats.write_labelled_images(tmp_path, NAMES[:5], size=8)
    rows = [[NAMES[0], "Effusion|Atelectasis", "train", 61], [NAMES[1], "No Finding", "train", 40],
            [NAMES[2], "Effusion", "validation", 3], [NAMES[3], "Hernia", "test", 7],
            [NAMES[4], "Atelectasis| Hernia", "TEST", 9]]
    table = formats.write_csv(tmp_path / "entries.csv", ["Image Index", "Finding Labels", "split", "Patient Age"],
                              rows)
    data = load_data("csv", table, input_size=8)
    assert data.task == Task("multilabel", ("Atelectasis", "Effusion", "Hernia"))  # sorted; age ignored
    assert data.train.labels.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert data.test.labels.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]] and len(data.val) == 1
    fixed = load_data("csv", table, input_size=8, names=["Hernia", "Effusion", "Atelectasis", "Mass"])
    assert fixed.train.labels[0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_one_zero_one_column_is_binary_and_gray_images_keep_one_channel(tmp_path):
    pixels = formats.write_labelled_images(tmp_path, NAMES, size=8, gray=True)
    formats.write_csv(tmp_path / "labels.csv", ["file", "pneumonia", "split"],
                      [[n, i % 2, "test" if i > 7 else "train"] for i, n in enumerate(NAMES)])
    data = load_data("csv", tmp_path / "labels.csv", input_size=8)
    assert data.task == Task("binary", ("not pneumonia", "pneumonia")) and data.val is None
    assert data.train.labels.dtype == torch.int64 and data.train.labels.tolist() == [0, 1] * 4
    assert data.in_chans == 1 and torch.equal(data.train.images[3], torch.from_numpy(pixels[NAMES[3]]))


def test_seeded_split_is_returned_written_and_read_back(tmp_path):
    columns_set(tmp_path)
    (tmp_path / "split.csv").unlink()
    first = load_data("csv", tmp_path, input_size=8, seed=3)
    assert first.assignment is not None and [f for f, _ in first.assignment] == NAMES
    assert sorted(s for _, s in first.assignment).count("train") == 7  # 70 / 10 / 20 of ten rows
    assert (len(first.train), len(first.val), len(first.test)) == (7, 1, 2)
    assert load_data("csv", tmp_path, input_size=8, seed=3).assignment == first.assignment
    assert load_data("csv", tmp_path, input_size=8, seed=4).assignment != first.assignment
    written = tmp_path / "run" / "split.csv"
    written.parent.mkdir()
    labelled.write_split_csv(written, first.assignment)
    again = load_data("csv", tmp_path, input_size=8, seed=99, split_file=written)
    assert torch.equal(again.test.images, first.test.images) and again.assignment is None
    assert labelled.read_split_csv(written) == dict(first.assignment)


def test_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    columns_set(tmp_path)
    first = load_data("csv", tmp_path, input_size=6)  # resized: 8 -> 6
    assert first.train.images.shape == (6, 3, 6, 6)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(folders, "load_image", no_decoding)
    assert torch.equal(load_data("csv", tmp_path, input_size=6).train.images, first.train.images)


def write_volume_set(tmp_path, dtype=np.uint8, shape=(4, 5, 6)):
    names = [f"case{i}.npy" for i in range(6)]
    volumes = formats.write_volumes(tmp_path, names, shape=shape, dtype=dtype)
    formats.write_csv(tmp_path / "labels.csv", ["filename", "mass", "split"],
                      [[n, i % 2, ["train", "train", "train", "train", "val", "test"][i]] for i, n in enumerate(names)])
    return names, volumes


def test_npy_volumes(tmp_path):
    names, volumes = write_volume_set(tmp_path)
    data = load_data("csv", tmp_path)
    assert data.spatial_dims == 3 and data.in_chans == 1 and data.train.images.shape == (4, 1, 4, 5, 6)
    assert torch.equal(data.test.images[0, 0], torch.from_numpy(volumes[names[5]]))
    assert data.task.kind == "binary" and data.train.images.dtype == torch.uint8
    resized = load_data("csv", tmp_path, input_size=8)
    assert resized.train.images.shape == (4, 1, 8, 8, 8) and resized.input_size == 8


def test_float_volumes_in_0_1_become_uint8(tmp_path):
    names, volumes = write_volume_set(tmp_path, dtype=np.float32)
    data = load_data("csv", tmp_path)
    assert torch.equal(data.val.images[0, 0], torch.from_numpy(np.rint(volumes[names[4]] * 255).astype(np.uint8)))


def test_bad_volumes_name_file_and_row(tmp_path):
    names, _ = write_volume_set(tmp_path)
    np.save(tmp_path / "images" / names[2], np.full((4, 5, 6), 300.0, dtype=np.float32))
    with pytest.raises(ConfigError, match=r"labels.csv row 4: .*case2.npy holds float32 values from 300"):
        load_data("csv", tmp_path)
    np.save(tmp_path / "images" / names[2], np.zeros((4, 5, 7), dtype=np.uint8))
    with pytest.raises(ConfigError, match="row 4: .*give --input-size"):
        load_data("csv", tmp_path)


@pytest.mark.parametrize(("header", "rows", "message"), [
    (["file", "labels"], [["1.png", "Effusion"], ["2.png", "Mass"]], r"row 3: unknown label 'Mass'"),
    (["file", "labels"], [["1.png", "Effusion"], ["2.png", ""]], r"row 3: no label .*No Finding"),
    (["file", "a", "b"], [["1.png", 1, 0], ["2.png", 0, 2]], r"row 3: column 'b' is '2'"),
    (["file", "a", "b"], [["1.png", 1, 0], ["missing.png", 0, 1]], r"row 3: image .*missing.png not found"),
    (["file", "a", "split"], [["1.png", 1, "train"], ["2.png", 0, "holdout"]], r"row 3: split 'holdout'"),
    (["file", "a"], [["1.png", 1], ["1.png", 0]], r"row 3: 1.png is listed twice \(also row 2\)"),
    (["file", "a"], [["1.png", 1], ["2.png", 0, 1]], r"row 3: 3 cells, the header has 2"),
    (["file", "a", "split"], [["1.png", 1, "train"], ["2.png", 0, "train"]], "no test rows"),
    (["file", "a"], [], "only a header"),
])
def test_bad_tables_name_the_file_and_row(tmp_path, header, rows, message):
    formats.write_labelled_images(tmp_path, ["1.png", "2.png"], size=8)
    table = formats.write_csv(tmp_path / "labels.csv", header, rows)
    with pytest.raises(ConfigError, match=message) as caught:
        load_data("csv", table, input_size=8, names=["Effusion"] if "labels" in header else None)
    assert str(table) in str(caught.value) and "\n" not in str(caught.value)


def test_empty_csv_and_a_split_file_missing_a_row(tmp_path):
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(ConfigError, match="labels.csv: empty CSV"):
        load_data("csv", tmp_path)
    columns_set(tmp_path)
    lines = (tmp_path / "split.csv").read_text().splitlines()
    (tmp_path / "split.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ConfigError, match=r"labels.csv row 11: 10.png has no row in .*split.csv"):
        load_data("csv", tmp_path, input_size=8)
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_data("csv", tmp_path / "nowhere")


@pytest.mark.slow
def test_real_miml(tmp_path):
    if not MIML.is_file():
        pytest.skip(f"{MIML} is not here")
    with tarfile.open(MIML) as tar:
        tar.extractall(tmp_path, filter="data")
    data = load_data("csv", tmp_path / "miml", input_size=32)
    assert data.task == Task("multilabel", ("desert", "mountains", "sea", "sunset", "trees"))
    assert (len(data.train), len(data.val), len(data.test)) == (1400, 200, 400)
    assert data.train.labels.sum(0).tolist() == [287, 320, 402, 323, 398]  # the README's label counts
    assert data.test.labels.sum(0).tolist() == [81, 92, 119, 101, 109]
    assert data.train.images.shape == (1400, 3, 32, 32)
