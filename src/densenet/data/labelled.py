"""Images or volumes labelled by a CSV file: the layout of ChestX-ray14, CheXpert and MIML.

    densenet train --dataset csv --data-dir data/miml/labels.csv     # or the folder holding labels.csv

The CSV (``--data-dir``: the file, or a folder holding ``labels.csv``) has one row per image:

- a filename column: the one named filename, filenames, file, image, image index or path (any case), else the
  first column. Names are relative to the ``images/`` folder beside the CSV when there is one, else to the
  CSV's folder;
- the labels, in either of two styles:
  * one 0/1 column per label (``Filenames,desert,mountains,sea,sunset,trees``): a multilabel task, or a binary
    one when there is a single label column (names ``not X``, ``X``). A row of zeros is an image with none of
    the labels (ChestX-ray14's "No Finding"); any value other than 0 or 1 is an error;
  * one column named labels, label, finding labels or findings holding ``|``-separated lists
    (``Effusion|Atelectasis``): a multilabel task over every label the file names (sorted), "No Finding" meaning
    none; an empty cell is an error (write "No Finding"). Other columns (patient, age, ...) are ignored;
- the split, from the first of: a ``split`` column (train, val, test); the ``split_file`` argument; a
  ``split.csv`` beside the labels (filename, split: MIML's layout); else a seeded 70/10/20 split of the rows
  (``seeded_split``), returned as ``Data.assignment`` for the training run to write into its folder
  (``write_split_csv``) so that passing that file back as ``split_file`` reproduces it.

Images are decoded once (``densenet.data.images.load_image``), resized to ``input_size`` squares (default: the
record's, 64), held in memory as uint8 and cached beside the data like the class-folder sets
(``densenet.data.folders.decode_all``), so a second load reads one file. A set whose images are all grayscale
is held with one channel. Files ending ``.npy`` are volumes: each (D, H, W) or (1, D, H, W), uint8
0..255 or floating point 0..1 (stored as uint8 = round(255 v), as MedMNIST 3D stores CT: rescale other ranges,
e.g. a CT window, before), held as (N, 1, D, H, W) uint8 with ``spatial_dims`` 3, resized (trilinear) to
``input_size`` cubes only when that is given, else all must share one shape.

Anything wrong with the input raises a ConfigError naming the file and the row (the header is row 1).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from densenet.data import folders
from densenet.data.augment import channel_stats
from densenet.data.splits import Data, Split
from densenet.data.task import Task, targets_array
from densenet.errors import ConfigError

FILE_COLUMNS = ("filename", "filenames", "file", "image", "image index", "path")
LIST_COLUMNS = ("labels", "label", "finding labels", "findings")
NO_FINDING = "no finding"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SEEDED_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test


def load_labelled(path: str | Path, *, train: bool = True, input_size: int | None = None, default_size: int = 64,
                  seed: int = 0, split_file: str | Path | None = None, names: Sequence[str] | None = None) -> Data:
    """The CSV-labelled set at ``path`` (the CSV, or a folder with labels.csv) as in-memory Splits.

    ``names`` fixes the label names and their order (those a trained network was given): a label the file
    names outside them is an error. ``train=False`` leaves the training split out (its images still give the
    mean and std)."""
    table = _find_csv(Path(path))
    header, rows = _read_csv(table)
    files, labels, task, split_col = _parse(table, header, rows, names)
    numbers = [number for number, _ in rows]  # each row's line in the file, for messages
    splits = _assign(table, files, numbers, rows, split_col, split_file, seed)
    root = table.parent / "images" if (table.parent / "images").is_dir() else table.parent
    paths = _image_paths(table, root, files, numbers)
    volumes = paths[0].suffix.lower() == ".npy"
    if volumes:
        images = _load_volumes(table, paths, numbers, input_size)
        size = int(images.shape[-2])
    else:
        size = input_size or default_size
        cache_name = f"{table.parent.name}-{table.stem}-{size}"  # two sets' caches may share a parent folder
        images, _ = folders.decode_all(root, [(p, 0) for p in paths], size, cache_name=cache_name)
        if np.array_equal(images[:, 0], images[:, 1]) and np.array_equal(images[:, 0], images[:, 2]):
            images = images[:, :1]  # every image grayscale: one channel, as X-ray sets are
    targets = targets_array(task, labels)
    out = {}
    for name in ("train", "val", "test"):
        index = np.flatnonzero(splits == name)
        out[name] = Split(torch.from_numpy(np.ascontiguousarray(images[index])),
                          torch.from_numpy(targets[index])) if len(index) else None
    if out["train"] is None or out["test"] is None:
        missing = "train" if out["train"] is None else "test"
        raise ConfigError(f"{table}: no {missing} rows in the split; each of train and test needs at least one")
    mean, std = channel_stats(out["train"].images)
    seeded = split_col is None and split_file is None and not (table.parent / "split.csv").is_file()
    return Data("csv", list(task.names), int(images.shape[1]), size, mean, std, out["train"] if train else None,
                out["test"], val=out["val"], task=task, spatial_dims=3 if volumes else 2,
                assignment=list(zip(files, splits.tolist(), strict=True)) if seeded else None)


def seeded_split(n: int, seed: int, fractions: tuple[float, float, float] = SEEDED_FRACTIONS) -> np.ndarray:
    """"train"/"val"/"test" for ``n`` rows, a random 70/10/20 (``fractions``) fixed by ``seed``: the same rows
    for the same seed and row count. Val and test get at least one row each where there are three rows."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(round(fractions[2] * n), 1 if n >= 3 else 0)
    n_val = max(round(fractions[1] * n), 1 if n >= 3 else 0)
    out = np.full(n, "train", dtype=object)
    out[order[:n_test]] = "test"
    out[order[n_test:n_test + n_val]] = "val"
    return out.astype(str)


def write_split_csv(path: str | Path, rows: Sequence[tuple[str, str]]) -> None:
    """Write (filename, split) rows as a ``filename,split`` CSV, atomically; ``split_file`` reads it back."""
    from densenet.files import atomic_write

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "split"])
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def read_split_csv(path: str | Path) -> dict[str, str]:
    """filename -> train/val/test from a split CSV (``write_split_csv``'s, or MIML's split.csv)."""
    path = Path(path)
    header, rows = _read_csv(path)
    lowered = [h.lower() for h in header]
    if "split" not in lowered:
        raise ConfigError(f"{path}: no split column (the header is {','.join(header)})")
    file_col = _file_column(header)
    split_col = lowered.index("split")
    out = {}
    for number, row in rows:
        name = row[file_col].strip()
        if name in out:
            raise ConfigError(f"{path} row {number}: {name} is listed twice")
        out[name] = _split_name(path, number, row[split_col])
    return out


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "labels.csv").is_file():
            return path / "labels.csv"
        found = sorted(p for p in path.glob("*.csv") if p.name != "split.csv")
        if len(found) == 1:
            return found[0]
        raise ConfigError(f"{path}: no labels.csv" + (f" and several CSV files ({', '.join(p.name for p in found)})"
                                                       if found else "") + "; --data-dir takes the labels CSV")
    raise ConfigError(f"{path}: no such file or folder; --data-dir takes a labels CSV (or the folder holding "
                      f"labels.csv)")


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (row number, cells) of every non-blank row; the header is row 1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as a UTF-8 CSV file ({exc})") from exc
    lines = list(csv.reader(io.StringIO(text)))
    numbered = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(lines) if any(c.strip() for c in row)]
    if not numbered:
        raise ConfigError(f"{path}: empty CSV file (expected a header and one row per image)")
    (_, header), rows = numbered[0], numbered[1:]
    if not rows:
        raise ConfigError(f"{path}: only a header, no rows")
    for number, row in rows:
        if len(row) != len(header):
            raise ConfigError(f"{path} row {number}: {len(row)} cells, the header has {len(header)}")
    return header, rows


def _file_column(header: list[str]) -> int:
    lowered = [h.lower() for h in header]
    return next((lowered.index(n) for n in FILE_COLUMNS if n in lowered), 0)


def _parse(table: Path, header: list[str], rows: list[tuple[int, list[str]]], names: Sequence[str] | None
           ) -> tuple[list[str], np.ndarray, Task, int | None]:
    """Filenames, labels (int64 (N, L) 0/1), the task and the split column's index (None when absent)."""
    lowered = [h.lower() for h in header]
    file_col = _file_column(header)
    split_col = lowered.index("split") if "split" in lowered else None
    list_col = next((lowered.index(n) for n in LIST_COLUMNS if n in lowered and lowered.index(n) != file_col), None)
    files: list[str] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        name = row[file_col]
        if not name:
            raise ConfigError(f"{table} row {number}: empty filename ({header[file_col]!r} column)")
        if name in seen:
            raise ConfigError(f"{table} row {number}: {name} is listed twice (also row {seen[name]})")
        seen[name] = number
        files.append(name)
    if list_col is not None:
        lists = []
        for number, row in rows:
            items = [item.strip() for item in row[list_col].split("|") if item.strip()]
            if not items:
                raise ConfigError(f"{table} row {number}: no label in column {header[list_col]!r} "
                                  f"(write \"No Finding\" for an image without any)")
            lists.append([item for item in items if item.lower() != NO_FINDING])
        label_names = tuple(names) if names is not None else tuple(sorted({i for items in lists for i in items}))
        if not label_names:
            raise ConfigError(f"{table}: no row names a label in column {header[list_col]!r}")
        index = {n: j for j, n in enumerate(label_names)}
        labels = np.zeros((len(rows), len(label_names)), dtype=np.int64)
        for i, ((number, _), items) in enumerate(zip(rows, lists, strict=True)):
            for item in items:
                if item not in index:
                    raise ConfigError(f"{table} row {number}: unknown label {item!r}; the labels are "
                                      f"{', '.join(label_names)}")
                labels[i, index[item]] = 1
        return files, labels, Task("multilabel", label_names), split_col
    columns = [j for j in range(len(header)) if j not in (file_col, split_col)]
    if not columns:
        raise ConfigError(f"{table}: no label columns (the header is {','.join(header)}); add one 0/1 column per "
                          f"label, or a 'labels' column of |-separated names")
    labels = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for i, (number, row) in enumerate(rows):
        for k, j in enumerate(columns):
            value = row[j]
            if value not in ("0", "1", "0.0", "1.0"):
                raise ConfigError(f"{table} row {number}: column {header[j]!r} is {value!r}; label columns hold "
                                  f"0 or 1")
            labels[i, k] = int(float(value))
    label_names = tuple(header[j] for j in columns)
    if names is not None and tuple(names) != label_names and not (len(columns) == 1 and len(names) == 2):
        raise ConfigError(f"{table}: the label columns are {', '.join(label_names)}, expected "
                          f"{', '.join(names)}")
    if len(columns) == 1:
        task = Task("binary", tuple(names) if names is not None else (f"not {label_names[0]}", label_names[0]))
    else:
        task = Task("multilabel", label_names)
    return files, labels, task, split_col


def _assign(table: Path, files: list[str], numbers: list[int], rows: list[tuple[int, list[str]]],
            split_col: int | None, split_file: str | Path | None, seed: int) -> np.ndarray:
    """train/val/test per row, from the split column, the split file, split.csv beside, or the seed."""
    if split_col is not None:
        return np.array([_split_name(table, number, row[split_col]) for number, row in rows])
    source = Path(split_file) if split_file is not None else table.parent / "split.csv"
    if split_file is None and not source.is_file():
        return seeded_split(len(files), seed)
    if not source.is_file():
        raise ConfigError(f"{source}: no such split file")
    assignment = read_split_csv(source)
    known = set(files)
    for name in assignment:
        if name not in known:
            raise ConfigError(f"{source}: {name} is not in {table}")
    out = []
    for number, name in zip(numbers, files, strict=True):
        if name not in assignment:
            raise ConfigError(f"{table} row {number}: {name} has no row in {source}")
        out.append(assignment[name])
    return np.array(out)


def _split_name(table: Path, number: int, value: str) -> str:
    split = SPLIT_NAMES.get(value.strip().lower())
    if split is None:
        raise ConfigError(f"{table} row {number}: split {value!r} is not train, val or test")
    return split


def _image_paths(table: Path, root: Path, files: list[str], numbers: list[int]) -> list[Path]:
    paths = []
    kinds = set()
    for number, name in zip(numbers, files, strict=True):
        path = root / name
        if not path.is_file() and (table.parent / name).is_file():
            path = table.parent / name
        if not path.is_file():
            raise ConfigError(f"{table} row {number}: image {root / name} not found")
        kinds.add(path.suffix.lower() == ".npy")
        if len(kinds) > 1:
            raise ConfigError(f"{table} row {number}: {name} mixes .npy volumes and images in one set")
        paths.append(path)
    return paths


def _load_volumes(table: Path, paths: list[Path], numbers: list[int], size: int | None) -> np.ndarray:
    """(N, 1, D, H, W) uint8 volumes, resized to size^3 when ``size`` is given."""
    out = []
    first_shape = None
    for number, path in zip(numbers, paths, strict=True):
        try:
            volume = read_volume(path, size)
        except ConfigError as exc:
            raise ConfigError(f"{table} row {number}: {exc}") from None
        first_shape = first_shape or volume.shape
        if volume.shape != first_shape:
            raise ConfigError(f"{table} row {number}: {path} is {volume.shape}, the first volume {first_shape}; "
                              f"give --input-size to resize them all to one cube")
        out.append(volume)
    return np.stack(out)[:, None]


NPY_MAGIC = b"\x93NUMPY"
VOLUME_FORMS = "(D, H, W) or (1, D, H, W), uint8 0..255 or floating point 0..1"


def read_volume(path: str | Path, size: int | None = None) -> np.ndarray:
    """One .npy volume as training holds it: (D, H, W) uint8, resized (trilinear, rounded) to a ``size`` cube
    when ``size`` is given and the volume is not one. Accepted: (D, H, W) or (1, D, H, W), uint8 0..255 or
    floating point 0..1 (stored as round(255 v)). Anything else is a ConfigError naming the file.
    ``densenet predict`` and ``densenet explain`` read a user's volumes with it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        if head != NPY_MAGIC:
            raise ValueError("no NumPy .npy header" + ("; a .npz archive holds several arrays"
                                                      if head.startswith(b"PK") else ""))
        volume = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot read {path} as a .npy array ({exc})") from exc
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3 or 0 in volume.shape:
        raise ConfigError(f"{path} has shape {volume.shape}; a volume is (D, H, W) or (1, D, H, W)")
    volume = _to_uint8(path, volume)
    if size is not None and volume.shape != (size,) * 3:
        scaled = torch.nn.functional.interpolate(torch.from_numpy(volume)[None, None].float(), size=(size,) * 3,
                                                 mode="trilinear", align_corners=False)
        volume = scaled[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return volume


def _to_uint8(path: Path, volume: np.ndarray) -> np.ndarray:
    if volume.dtype == np.uint8:
        return volume
    numeric = np.issubdtype(volume.dtype, np.number) or volume.dtype == np.bool_
    if np.issubdtype(volume.dtype, np.floating) and np.all(np.isfinite(volume)) and volume.min() >= 0 \
            and volume.max() <= 1:
        return np.rint(volume * 255.0).astype(np.uint8)
    values = f" values from {volume.min()} to {volume.max()}" if numeric else " values"
    raise ConfigError(f"{path} holds {volume.dtype}{values}; volumes are uint8 0..255 or floating point 0..1 "
                      f"(rescale first, e.g. a CT window)")
