"""What a loaded data set is: in-memory ``Split``s and the ``Data`` record around them.

Kept apart from the loaders (``densenet.data.datasets``, ``medmnist``, ``labelled``) so that each loader can
build a Data without importing the others; ``densenet.data.datasets`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from densenet.data.task import Task


@dataclass
class Split:
    """An in-memory split: uint8 images (N, C, H, W) or volumes (N, C, D, H, W), and labels as the task stores
    them: int64 (N,) class indices (multiclass, binary) or float32 (N, L) 0/1 (multilabel)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Data:
    """A loaded data set: its splits and what training, evaluation and prediction need to know about them.

    ``classes`` are the task's names (binary: negative, positive; multilabel: the labels); ``task`` defaults
    to multiclass over ``classes``. ``assignment``, when set, is the (filename, split) of every row of a split
    the loader drew from the seed (``densenet.data.labelled``): the training run writes it into its folder
    (``labelled.write_split_csv``) so the split can be reproduced.
    """

    name: str
    classes: list[str]
    in_chans: int
    input_size: int  # the side of the images (volumes: of the H axis)
    mean: list[float]
    std: list[float]
    train: Split | torch.utils.data.Dataset | None
    test: Split | torch.utils.data.Dataset
    val: Split | torch.utils.data.Dataset | None = None
    task: Task = field(default=None)  # type: ignore[assignment]  # None: multiclass over classes
    spatial_dims: int = 2
    assignment: list[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = Task.multiclass(self.classes)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.test, Split)

    @property
    def num_classes(self) -> int:
        """The number of class or label names; the network's outputs are ``task.num_outputs`` (1 for binary)."""
        return len(self.classes)
