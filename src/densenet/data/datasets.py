"""The data sets of the paper, plus your own folders and a built-in default, behind one ``load_data``.

    data = load_data("cifar10", "data/cifar10")    # official python pickles or train/ test/ class folders
    data.train.images  # uint8 (50000, 3, 32, 32), in memory

- cifar10, cifar100: torchvision's download layout (``cifar-10-batches-py/``, ``cifar-100-python/``) under
  the data folder, or an image-folder tree ``train/<class>/*``, ``test/<class>/*`` (decoded once, cached);
- svhn: ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``; train + extra for training with 6,000
  images held out for validation (400 per class from train, 200 per class from extra), pixels / 255;
- imagenet: ``train/`` and ``val/`` class folders, streamed with the fb.resnet.torch transforms;
- folder: your own ``train/`` and ``val/`` (or ``test/``) class folders, streamed likewise;
- digits: scikit-learn's 1,797 8x8 handwritten digits, a stratified 20% test split (no download);
- medmnist: a MedMNIST .npz file (``--data-dir`` is the file), 2D or 3D, with its own train/val/test
  (``densenet.data.medmnist``);
- csv: images, or .npy volumes, labelled by a CSV file (``--data-dir`` is the CSV or its folder), 0/1 columns
  or |-separated label lists, a split column, split file or seeded split (``densenet.data.labelled``).

Every Data carries its ``task`` (``densenet.data.task.Task``: multiclass, binary or multilabel), which decides
the network's outputs (``data.task.num_outputs``), loss and metrics; the paper's sets are multiclass over
``classes``. Split labels are int64 (N,) for multiclass and binary tasks, float32 (N, L) for multilabel ones.
``spatial_dims`` is 3 for volumes, whose Split images are uint8 (N, C, D, H, W).

The small sets are held in memory as uint8 tensors (``Split``) and augmented a batch at a time on the
training device (``densenet.data.augment``); the large ones are torch Datasets for DataLoader workers.
What is known about each set before loading it (classes, size, defaults) is its record in
``densenet.data.registry``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from densenet.data import folders
from densenet.data.augment import channel_stats
from densenet.data.registry import DATASETS, IMAGENET_MEAN, IMAGENET_STD, Augment, dataset_record
from densenet.data.splits import Data, Split

__all__ = ["Data", "Split", "load_data", "subset", "default_data_dir", "worker_error_message"]
from densenet.errors import DenseNetError


def default_data_dir(name: str) -> Path:
    return Path("data") / name


def load_data(name: str, data_dir: str | Path | None = None, *, augment: Augment | None = None,
              download: bool = False, input_size: int | None = None, train: bool = True,
              ten_crop: bool = False, seed: int = 0, split_file: str | Path | None = None,
              names: Sequence[str] | None = None) -> Data:
    """The named data set; ``train=False`` loads the test split only (for ``densenet evaluate``).

    For ``csv``: ``seed`` draws the split when the file gives none, ``split_file`` gives one (a run folder's
    split.csv), ``names`` fixes the label names (a trained network's). ``medmnist`` and ``csv`` take the file
    as ``data_dir``."""
    record = dataset_record(name)
    root = Path(data_dir) if data_dir else default_data_dir(name)
    if name == "medmnist":
        from densenet.data.medmnist import load_medmnist

        return load_medmnist(root, train, input_size)
    if name == "csv":
        from densenet.data.labelled import load_labelled

        return load_labelled(root, train=train, input_size=input_size, default_size=record.input_size, seed=seed,
                             split_file=split_file, names=names)
    if name == "digits":
        return _digits(train)
    if root.is_file():  # every set below is read from a folder
        raise DenseNetError(f"--data-dir {root} is a file, not a folder: {name} is read from a folder (see "
                            f"`densenet train --help` and docs/training.md for its layout)")
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, download, train)
    if name == "svhn":
        return _svhn(root, download, train, seed)
    return _streamed(name, root, augment or record.augment, input_size or record.input_size, train, ten_crop)


def subset(split: Split, n: int, seed: int = 0) -> Split:
    """A stratified random ``n`` of an in-memory split (the same for a given seed): for short runs.
    Multi-label targets (N, L) are not stratified: a plain random ``n``."""
    if n >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    if split.labels.dim() == 2:
        index = order[:n].sort().values
        return Split(split.images[index], split.labels[index])
    classes = int(split.labels.max()) + 1
    per_class = -(-n // classes)
    taken = torch.zeros(classes, dtype=torch.long)
    keep = []
    for i in order.tolist():
        c = int(split.labels[i])
        if taken[c] < per_class:
            taken[c] += 1
            keep.append(i)
    index = torch.tensor(sorted(keep[:n]))
    return Split(split.images[index], split.labels[index])


def worker_error_message(exc: BaseException) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker (which wraps it)."""
    text = str(exc).strip()
    if not text.startswith("Caught "):
        return text.splitlines()[0] if text else type(exc).__name__
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                 torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def _digits(train: bool) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # 1,797 scans, 8x8, values 0..16
    images = np.rint(x * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(images, y, test_size=0.2, stratify=y, random_state=0)
    train_split = _split(x_train, y_train)
    mean, std = channel_stats(train_split.images)
    return Data("digits", [str(d) for d in range(10)], 1, 8, mean, std, train_split if train else None,
                _split(x_test, y_test))


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "label_names", "labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_label_names", "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _cifar(name: str, root: Path, download: bool, train: bool) -> Data:
    folder, train_files, test_file, meta_file, names_key, labels_key, url = _CIFAR[name]
    for tree in (root, root / name):  # the image-folder layout, e.g. data/cifar10/train/<class>/*.jpg
        if (tree / "train").is_dir() or (tree / "test").is_dir():
            return _cifar_images(name, tree, train)
    base = root / folder
    if not base.is_dir() and download:
        from torchvision import datasets

        getattr(datasets, name.upper())(str(root), train=True, download=True)
    if not base.is_dir():
        raise DenseNetError(
            f"{name} not found under {root}: put the official python version there ({root}/{folder}/, "
            f"unpacked from {url}), or an image-folder tree {root}/train/<class>/*.png and {root}/test/<class>/*; "
            f"or pass --download when online; --data-dir chooses another folder")
    missing = [f for f in [*train_files, test_file, meta_file] if not (base / f).is_file()]
    if missing:
        raise DenseNetError(f"{name} under {base} is incomplete: missing {', '.join(missing)} "
                            f"(re-extract {url.rsplit('/', 1)[1]} there)")
    classes = [str(c) for c in _unpickle(base / meta_file)[names_key]]

    def read(files: list[str]) -> Split:
        parts = [_unpickle(base / f) for f in files]
        try:
            images = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
            labels = np.concatenate([np.asarray(p[labels_key], dtype=np.int64) for p in parts])
        except (KeyError, ValueError) as exc:
            raise DenseNetError(f"{name} under {base} is not the official python format ({exc})") from exc
        return _split(images, labels)

    train_split = read(train_files) if train else None
    mean, std = channel_stats(train_split.images) if train_split is not None else ([0.5] * 3, [0.25] * 3)
    return Data(name, classes, 3, 32, mean, std, train_split, read([test_file]))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DenseNetError(f"cannot read {path}: {exc} (re-extract the official archive)") from exc
    if not isinstance(data, dict):
        raise DenseNetError(f"{path} is not a CIFAR batch file (it holds a {type(data).__name__})")
    return data


def _cifar_images(name: str, tree: Path, train: bool) -> Data:
    classes, train_samples = folders.scan(tree / "train") if train or (tree / "train").is_dir() else (None, [])
    classes, test_samples = folders.scan(tree / "test", classes)
    if train:
        train_split = _split(*folders.decode_all(tree / "train", train_samples, 32, cache_name=f"{name}-train"))
        mean, std = channel_stats(train_split.images)
    else:
        train_split, mean, std = None, [0.5] * 3, [0.25] * 3
    test_split = _split(*folders.decode_all(tree / "test", test_samples, 32, cache_name=f"{name}-test"))
    return Data(name, classes, 3, 32, mean, std, train_split, test_split)


def _svhn(root: Path, download: bool, train: bool, seed: int) -> Data:
    names = ["train", "extra", "test"] if train else ["test"]
    for split in names:
        if not (root / f"{split}_32x32.mat").is_file() and download:
            from torchvision import datasets

            datasets.SVHN(str(root), split=split, download=True)
    missing = [f"{s}_32x32.mat" for s in names if not (root / f"{s}_32x32.mat").is_file()]
    if missing:
        raise DenseNetError(f"svhn: {', '.join(missing)} not found in {root}; put the official files from "
                            f"http://ufldl.stanford.edu/housenumbers/ there (train_32x32.mat, extra_32x32.mat, "
                            f"test_32x32.mat), or pass --download when online")
    parts = {s: _read_mat(root / f"{s}_32x32.mat") for s in names}
    val = None
    train_split = None
    if train:
        # Sermanet et al. (2012), followed by the paper: 400 per class from train, 200 from extra.
        rng = np.random.default_rng(seed)
        keep, held = [], []
        for s, per_class in (("train", 400), ("extra", 200)):
            x, y = parts[s]
            hold = np.zeros(len(y), dtype=bool)
            for c in range(10):
                idx = np.flatnonzero(y == c)
                hold[rng.permutation(idx)[:min(per_class, len(idx) // 5)]] = True
            keep.append((x[~hold], y[~hold]))
            held.append((x[hold], y[hold]))
        train_split = _split(np.concatenate([k[0] for k in keep]), np.concatenate([k[1] for k in keep]))
        val = _split(np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held]))
    record = DATASETS["svhn"]  # the paper divides the pixels by 255 and does nothing else: mean 0, std 1
    return Data("svhn", [str(d) for d in range(10)], 3, 32, list(record.mean), list(record.std), train_split,
                _split(*parts["test"]), val=val)


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
        x = np.asarray(mat["X"], dtype=np.uint8)  # (32, 32, 3, N)
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError, scipy.io.matlab.MatReadError) as exc:
        raise DenseNetError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc!r} "
                            f"(expected the official SVHN format 2 file with X (32, 32, 3, N) and y (N, 1))") from exc
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DenseNetError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, N) matching y's {len(y)} labels")
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    return x.transpose(3, 2, 0, 1), y


def _streamed(name: str, root: Path, augment: Augment, size: int, train: bool, ten_crop: bool) -> Data:
    if not root.is_dir():
        layout = "train/ and val/" if name == "imagenet" else "train/ and val/ (or test/)"
        raise DenseNetError(f"{name}: {root} does not exist; expected {layout} class folders there "
                            f"({root}/train/<class>/<images>); --data-dir chooses the folder")
    test_dir = root / "val"
    if name == "folder" and not test_dir.is_dir():
        test_dir = root / "test"
    if not test_dir.is_dir():
        raise DenseNetError(f"{name}: no {root}/val/ class folders (held-out images, the same classes as train/)")
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    classes, train_samples = folders.scan(root / "train") if (train or (root / "train").is_dir()) else (None, [])
    classes, test_samples = folders.scan(test_dir, classes)
    train_set = folders.ImageFiles(classes, train_samples, folders.train_transform(size, augment, mean, std))
    test_set = folders.ImageFiles(classes, test_samples, folders.eval_transform(size, mean, std, ten_crop))
    return Data(name, classes, 3, size, mean, std, train_set if train else None, test_set)
