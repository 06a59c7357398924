"""MedMNIST ``.npz`` files (v2 and MedMNIST+, any set and size, 2D and 3D), with their own three splits.

    densenet train --dataset medmnist --data-dir ../shared/data/medmnist/pneumoniamnist.npz

Every MedMNIST file holds ``{train,val,test}_images`` and ``{train,val,test}_labels``:

- images uint8 (N, H, W) grayscale, (N, H, W, 3) colour, or (N, D, H, W) volumes (the 3D sets, e.g.
  AdrenalMNIST3D at 28^3 or 64^3); held as Split images (N, 1, H, W), (N, 3, H, W) or (N, 1, D, H, W) and
  ``Data.spatial_dims`` 2 or 3;
- labels (N, 1) class indices (binary and multi-class sets, ordinal ones as multi-class) or (N, L) 0/1
  (multi-label: ChestMNIST). The task follows from the labels of the three splits together
  (``densenet.data.task.infer_task``); class names come from ``KNOWN_NAMES`` for the files named there
  (``pneumoniamnist.npz``, ``pneumoniamnist_64.npz``, ...), else "0".."n-1".

The images keep their size (choose the file of the size you want: ``_64``, ``_128``, ``_224``); mean and std
come from the training images. A file that is not an .npz, lacks a key, or holds arrays of the wrong shape or
disagreeing counts raises a ConfigError naming the file and the key.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from densenet.data.augment import channel_stats
from densenet.data.splits import Data, Split
from densenet.data.task import Task, infer_task, targets_array
from densenet.errors import ConfigError

SPLITS = ("train", "val", "test")

# MedMNIST's own label names (medmnist/info.py) for the sets whose files are commonly met here.
KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "adrenalmnist3d": ("normal", "mass"),
    "chestmnist": ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
}


def set_name(path: str | Path) -> str:
    """The MedMNIST set a file holds, from its name: pneumoniamnist_64.npz -> pneumoniamnist."""
    return re.sub(r"_\d+$", "", Path(path).stem.lower())


def load_medmnist(path: str | Path, train: bool = True, input_size: int | None = None) -> Data:
    """The file's three splits as in-memory uint8 Splits; ``train=False`` leaves out the training split (its
    images still give the mean and std, as at training time). ``input_size``, when given, must be the file's."""
    path = Path(path)
    arrays = _read(path)
    shape = arrays["train_images"].shape[1:]
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] == 3):
        spatial_dims, in_chans = 2, 1 if len(shape) == 2 else 3
    elif len(shape) == 3:
        spatial_dims, in_chans = 3, 1
    else:
        raise ConfigError(f"{path}: train_images has shape {arrays['train_images'].shape}; expected (N, H, W), "
                          f"(N, H, W, 3) or (N, D, H, W)")
    side = shape[0] if spatial_dims == 2 else shape[1]
    if input_size is not None and input_size != side:
        raise ConfigError(f"{path} holds {'x'.join(map(str, shape[:2] if spatial_dims == 2 else shape))} "
                          f"{'images' if spatial_dims == 2 else 'volumes'}, not {input_size}: choose the file of "
                          f"that size (e.g. {set_name(path)}_{input_size}.npz) or leave --input-size out")
    labels = {s: arrays[f"{s}_labels"] for s in SPLITS}
    task = _task(path, labels)
    splits = {s: _split(arrays[f"{s}_images"], labels[s], task, in_chans) for s in SPLITS}
    mean, std = channel_stats(splits["train"].images)
    return Data("medmnist", list(task.names), in_chans, side, mean, std, splits["train"] if train else None,
                splits["test"], val=splits["val"], task=task, spatial_dims=spatial_dims)


def _read(path: Path) -> dict[str, np.ndarray]:
    """The six arrays, checked for presence, dtype, rank and matching counts."""
    if path.is_dir():
        found = ", ".join(sorted(p.name for p in path.glob("*.npz"))[:5]) or "none"
        raise ConfigError(f"{path} is a folder; --data-dir takes a MedMNIST .npz file (there: {found})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; --data-dir takes a MedMNIST .npz file (e.g. pneumoniamnist.npz)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not a readable MedMNIST .npz file ({reason})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError(f"{path}: a single .npy array, not a MedMNIST .npz archive")
    with archive:
        present = set(archive.files)
        missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in present]
        if missing:
            raise ConfigError(f"{path}: missing key {missing[0]}"
                              + (f" (and {', '.join(missing[1:])})" if len(missing) > 1 else "")
                              + "; a MedMNIST file has {train,val,test}_images and _labels, this one has "
                              + (", ".join(sorted(present)) or "no arrays"))
        arrays = {}
        for key in (f"{s}_{k}" for s in SPLITS for k in ("images", "labels")):
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(f"{path}: key {key} cannot be read ({reason})") from exc
    per_image = None
    for s in SPLITS:
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if images.ndim not in (3, 4) or images.shape[0] == 0:
            raise ConfigError(f"{path}: {s}_images has shape {images.shape}; expected (N, H, W), (N, H, W, 3) or "
                              f"(N, D, H, W) with N > 0")
        if images.dtype != np.uint8:
            raise ConfigError(f"{path}: {s}_images is {images.dtype}; MedMNIST images are uint8")
        per_image = per_image or images.shape[1:]
        if images.shape[1:] != per_image:
            raise ConfigError(f"{path}: {s}_images are {images.shape[1:]}, train_images {per_image}")
        if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
            raise ConfigError(f"{path}: {s}_labels has shape {labels.shape} for {images.shape[0]} images in "
                              f"{s}_images; expected ({images.shape[0]}, 1) or ({images.shape[0]}, L)")
    widths = {arrays[f"{s}_labels"].reshape(len(arrays[f"{s}_labels"]), -1).shape[1] for s in SPLITS}
    if len(widths) > 1:
        raise ConfigError(f"{path}: the label arrays disagree on the number of columns ({sorted(widths)})")
    return arrays


def _task(path: Path, labels: dict[str, np.ndarray]) -> Task:
    combined = np.concatenate([labels[s].reshape(len(labels[s]), -1) for s in SPLITS])
    names = KNOWN_NAMES.get(set_name(path))
    task = infer_task(combined, None, source=f"{path}: *_labels")
    if names is not None and len(names) == len(task.names):
        task = Task(task.kind, names)
    return task


def _split(images: np.ndarray, labels: np.ndarray, task: Task, in_chans: int) -> Split:
    if images.ndim == 3 or in_chans == 1:  # (N, H, W) or (N, D, H, W): one channel
        images = images[:, None]
    else:  # (N, H, W, 3) colour
        images = images.transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(targets_array(task, labels)))
