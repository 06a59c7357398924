"""Small data sets in their official on-disk formats, written by the tests (no download, a few KB each)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random uint8 images (n, 3, size, size)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta as torchvision's download lays them out."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    all_x, all_y = [], []
    for i in range(1, 6):
        x = images(per_batch, seed=i)
        y = [(i + j) % 10 for j in range(per_batch)]
        _dump(base / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y,
                                          "data": x.reshape(per_batch, -1), "filenames": [b"x.png"] * per_batch})
        all_x.append(x)
        all_y += y
    tx = images(test, seed=9)
    _dump(base / "test_batch", {"labels": [j % 10 for j in range(test)], "data": tx.reshape(test, -1)})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(base / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return {"train_x": np.concatenate(all_x), "train_y": np.array(all_y), "test_x": tx}


def write_cifar100(root: Path, n: int = 8, test: int = 4) -> dict[str, np.ndarray]:
    """cifar-100-python/train, test, meta (fine and coarse labels)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    x, tx = images(n, seed=1), images(test, seed=2)
    y = [(7 * j) % 100 for j in range(n)]
    _dump(base / "train", {"fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x.reshape(n, -1)})
    _dump(base / "test", {"fine_labels": list(range(test)), "coarse_labels": [0] * test, "data": tx.reshape(test, -1)})
    _dump(base / "meta", {"fine_label_names": [f"class{i:02d}" for i in range(100)],
                          "coarse_label_names": [f"super{i}" for i in range(20)]})
    return {"train_x": x, "train_y": np.array(y)}


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_svhn(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split}_32x32.mat with X (32, 32, 3, N) uint8 and y (N, 1), the digit 0 labelled 10 (format 2)."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (split, n) in enumerate(counts.items()):
        x = images(n, seed=seed + i)  # (n, 3, 32, 32)
        digits = np.arange(n) % 10
        scipy.io.savemat(root / f"{split}_32x32.mat",
                         {"X": x.transpose(2, 3, 1, 0), "y": np.where(digits == 0, 10, digits).reshape(n, 1)})
        out[split] = (x, digits)
    return out


def write_class_folders(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (32, 32),
                        ext: str = ".png", seed: int = 0) -> dict[Path, np.ndarray]:
    """root/<class>/NNNN.ext images; returns each file's pixels (H, W, 3)."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = root / name / f"{j:04d}{ext}"
            Image.fromarray(pixels).save(path)
            written[path] = pixels
    return written


def write_medmnist(path: Path, counts: tuple[int, int, int] = (6, 3, 4), image_shape: tuple[int, ...] = (8, 8),
                   labels: str = "binary", classes: int = 2, seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """A MedMNIST .npz file: {train,val,test}_images uint8 (N, *image_shape) and _labels (N, 1) class indices
    (``labels="binary"`` or ``"multiclass"`` over ``classes``) or (N, classes) 0/1 (``"multilabel"``), every
    class present in train. ``overrides`` replace or (with None) drop arrays, to make malformed files."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        if labels == "multilabel":
            y = rng.integers(0, 2, (n, classes)).astype(np.uint8)
            y[0] = 1  # every label present at least once
            y[1] = 0  # and absent at least once
        else:
            y = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
        arrays[f"{split}_labels"] = y
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def write_labelled_images(folder: Path, names: list[str], size: int = 8,
                          gray: bool = False, ext: str = ".png", seed: int = 0) -> dict[str, np.ndarray]:
    """folder/images/<name> files of ``size`` px (no resizing needed to compare pixels); the pixels by name,
    (3, H, W) (or (1, H, W) when ``gray``)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        if gray:
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            out[name] = pixels[None]
        else:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            out[name] = pixels.transpose(2, 0, 1)
        Image.fromarray(pixels).save(folder / "images" / name)
    return out


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """A CSV file with ``header`` and ``rows`` (cells written with str())."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(_cell(c) for c in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value) -> str:
    text = str(value)
    return f'"{text}"' if "," in text else text


def write_volumes(folder: Path, names: list[str], shape: tuple[int, int, int] = (4, 5, 6), dtype=np.uint8,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """folder/images/<name>.npy volumes (D, H, W): uint8 0..255 or float32 0..1; the arrays by name."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        volume = (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == np.uint8
                  else rng.random(shape).astype(dtype))
        np.save(folder / "images" / name, volume)
        out[name] = volume
    return out
