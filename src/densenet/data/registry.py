"""One record per data set: everything training, evaluation, prediction and reports need to know about it.

    from densenet.data.registry import dataset_record
    dataset_record("cifar10").epochs          # 300, the paper's protocol
    dataset_record("svhn").dropout            # True: 0.2 dropout where the data are not augmented

Adding a data set means adding one record here (and its loader in ``densenet.data.datasets``). This module
imports nothing heavy, so the command line can list data sets and build its flags without loading torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from densenet.errors import ConfigError

Augment = Literal["standard", "none"]

# torchvision's (and fb.resnet.torch's) ImageNet statistics, used for ImageNet, image folders and ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetRecord:
    """What is known about a data set before reading it, and the paper's training protocol for it."""

    name: str
    label: str  # the paper's column name (C10, C100, SVHN, ImageNet); "+" is added when augmented
    num_classes: int | None  # None: as many as the class folders
    in_chans: int
    input_size: int  # the side of the square images the model sees
    in_memory: bool  # small sets: uint8 tensors augmented on the device; others stream through DataLoader workers
    augment: Augment  # the default augmentation: "standard" is the paper's (pad-crop-flip; ImageNet: fb.resnet.torch)
    mean: tuple[float, ...] | None  # normalisation; None: computed from the training images when they are loaded
    std: tuple[float, ...] | None
    model: str  # the default model
    epochs: int
    batch_size: int
    milestones: tuple[int, ...] | None  # the step schedule's epochs; None: 50% and 75% of the epochs
    dropout: bool  # the paper's dropout 0.2 applies when the data are not augmented
    threads: int | None = None  # CPU threads for training (None: torch's choice, one per core)
    preprocess: Literal["resize", "crop"] = "resize"  # predict: plain resize to input_size, or resize 256/224 + crop
    description: str = ""


DATASETS: dict[str, DatasetRecord] = {record.name: record for record in (
    # 8x8 images: the ops are too small for a second thread to pay, and on a busy machine two threads wait on
    # each other at every op (measured here: 313 images/s with one, 12 with two).
    DatasetRecord("digits", "digits", 10, 1, 8, True, "none", None, None, "densenet_bc40_k12", 20, 64, None,
                  dropout=False, threads=1, description="scikit-learn's 1,797 8x8 handwritten digits (built in)"),
    DatasetRecord("cifar10", "C10", 10, 3, 32, True, "standard", None, None, "densenet_bc100_k12", 300, 64, None,
                  dropout=True, description="CIFAR-10: 50,000 + 10,000 32x32 colour images, 10 classes"),
    DatasetRecord("cifar100", "C100", 100, 3, 32, True, "standard", None, None, "densenet_bc100_k12", 300, 64, None,
                  dropout=True, description="CIFAR-100: 50,000 + 10,000 32x32 colour images, 100 classes"),
    # The paper divides SVHN's pixels by 255 and does nothing else: mean 0, std 1.
    DatasetRecord("svhn", "SVHN", 10, 3, 32, True, "none", (0.0,) * 3, (1.0,) * 3, "densenet_bc100_k12", 40, 64,
                  None, dropout=True, description="SVHN: 32x32 house-number digits; train + extra, 6,000 held out"),
    DatasetRecord("imagenet", "ImageNet", 1000, 3, 224, False, "standard", IMAGENET_MEAN, IMAGENET_STD,
                  "densenet121", 90, 256, (30, 60), dropout=False, preprocess="crop",
                  description="ILSVRC 2012: train/ and val/ class folders, streamed"),
    DatasetRecord("folder", "folder", None, 3, 224, False, "standard", IMAGENET_MEAN, IMAGENET_STD, "densenet121",
                  90, 64, None, dropout=False, preprocess="crop",
                  description="your own train/ and val/ (or test/) class folders, streamed"),
    # MedMNIST's own protocol: 100 epochs, batch 128, the rate divided by 10 at 50 and 75; the size, channels
    # and task come from the file (--data-dir FILE.npz), in_chans and input_size here are PneumoniaMNIST's.
    DatasetRecord("medmnist", "MedMNIST", None, 1, 28, True, "standard", None, None, "densenet_bc100_k12", 100, 128,
                  (50, 75), dropout=False,
                  description="a MedMNIST .npz file (--data-dir FILE.npz), 2D or 3D, its own train/val/test"),
    DatasetRecord("csv", "CSV", None, 3, 64, True, "standard", None, None, "densenet_bc100_k12", 100, 64, None,
                  dropout=False, description="images or .npy volumes labelled by a CSV (--data-dir labels.csv), "
                                             "0/1 columns or |-separated lists, decoded once to 64 px"),
)}


def dataset_record(name: str) -> DatasetRecord:
    """The record of a data set; a ConfigError naming the close matches when there is none."""
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), list(DATASETS), n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown data set {name!r}; {hint}choose from {', '.join(DATASETS)}")
    return DATASETS[name]
