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
