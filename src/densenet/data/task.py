"""What a network is asked to predict: one record deciding the outputs, the loss, the activation and the targets.

    task = Task("binary", ("normal", "pneumonia"))
    task.num_outputs                       # 1: one logit, the positive class's
    loss = task.loss(pos_weight=positive_weight(task, train.labels))
    probs = task.probabilities(logits)     # sigmoid here; softmax for "multiclass"
    task.predict(probs)                    # 0/1 per image (multilabel: 0/1 per label)

Three kinds, as medical and multi-label data have them:

- ``multiclass``: one label per image among ``names`` (CIFAR, ImageNet, ordinal grades as classes); as many
  logits as names, softmax, cross-entropy; targets int64 class indices (N,).
- ``binary``: ``names`` = (negative, positive); ONE logit (the positive class's), sigmoid, BCE with logits;
  targets int64 0/1 (N,), as multiclass stores them, so a Split, ``subset`` and stratification treat both alike
  (the loss converts them to float).
- ``multilabel``: any number of ``names`` per image (none included: ChestX-ray14's "No Finding"); one logit per
  name, sigmoid, BCE with logits; targets float32 0/1 (N, L).

The data decide the task (``infer_task`` on the label arrays, or the loader that knows its format); training
records ``to_dict()`` in config.yaml and the weights' metadata, and evaluation and prediction rebuild it with
``Task.from_dict``. Metrics per task are in ``densenet.data.metrics``. torch is imported only where a loss or
probabilities are asked for, so the command line can read a task without loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from densenet.errors import ConfigError

if TYPE_CHECKING:
    import torch

TaskKind = Literal["multiclass", "binary", "multilabel"]
KINDS: tuple[str, ...] = get_args(TaskKind)


@dataclass(frozen=True)
class Task:
    """The kind of prediction and the names of its classes (multiclass, binary) or labels (multilabel)."""

    kind: TaskKind
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown task kind {self.kind!r}; choose from {', '.join(KINDS)}")
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if self.kind == "binary" and len(self.names) != 2:
            raise ConfigError(f"a binary task has two names (negative, positive), not {len(self.names)}: "
                              f"{', '.join(self.names)}")
        if not self.names:
            raise ConfigError(f"a {self.kind} task needs at least one class or label name")
        if len(set(self.names)) != len(self.names):
            twice = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(f"the {self.kind} task names {', '.join(twice)} more than once")

    @property
    def num_outputs(self) -> int:
        """Logits the network's classifier gives: 1 for binary, one per name otherwise."""
        return 1 if self.kind == "binary" else len(self.names)

    @property
    def label_names(self) -> tuple[str, ...]:
        """What each output scores: the positive class for binary, else the names (per-label metric keys)."""
        return self.names[1:] if self.kind == "binary" else self.names

    @property
    def sigmoid(self) -> bool:
        """True where every output is an independent probability (binary, multilabel)."""
        return self.kind != "multiclass"

    @property
    def target_dtype(self) -> torch.dtype:
        """How a Split stores the targets: int64 (N,) for multiclass and binary, float32 (N, L) for multilabel."""
        import torch

        return torch.float32 if self.kind == "multilabel" else torch.int64

    def loss(self, label_smoothing: float = 0.0, pos_weight: torch.Tensor | Sequence[float] | None = None
             ) -> torch.nn.Module:
        """The training loss, called as ``loss(logits, targets)`` with the Split's targets as stored.

        multiclass: ``CrossEntropyLoss(label_smoothing=...)``; binary and multilabel: ``BCEWithLogitsLoss`` with
        ``pos_weight`` (one per output, e.g. ``positive_weight``) weighing the positives against imbalance.
        """
        import torch

        if self.kind == "multiclass":
            if pos_weight is not None:
                raise ConfigError("pos_weight is for binary and multilabel tasks; this one is multiclass")
            return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        if label_smoothing:
            raise ConfigError(f"--label-smoothing is for multiclass tasks (cross-entropy); this one is {self.kind}")
        weight = None
        if pos_weight is not None:
            weight = torch.as_tensor(pos_weight, dtype=torch.float32).reshape(-1)
            if weight.numel() != self.num_outputs:
                raise ConfigError(f"pos_weight has {weight.numel()} values; the {self.kind} task has "
                                  f"{self.num_outputs} output{'s' if self.num_outputs > 1 else ''}")
        from densenet.data.losses import BCEWithLogits

        return BCEWithLogits(pos_weight=weight)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, num_outputs) logits -> probabilities of the same shape: softmax (multiclass) or sigmoid."""
        logits = logits.float()
        return logits.sigmoid() if self.sigmoid else logits.softmax(dim=1)

    def predict(self, probs, threshold: float = 0.5):
        """Decisions from probabilities (torch or numpy): the argmax class (N,) for multiclass, 0/1 (N,) for
        binary (probability of the positive class above ``threshold``), 0/1 (N, L) for multilabel; int64.
        ``threshold`` may be one number or one per label (set on validation data)."""
        if self.kind == "multiclass":
            return probs.argmax(1)
        if isinstance(probs, np.ndarray):
            decided = probs > np.asarray(threshold)
            decided = decided.astype(np.int64)
        else:
            import torch

            decided = (probs > torch.as_tensor(threshold, dtype=probs.dtype, device=probs.device)).long()
        return decided.reshape(-1) if self.kind == "binary" else decided

    def to_dict(self) -> dict[str, Any]:
        """Plain types for config.yaml and the weights' metadata."""
        return {"kind": self.kind, "names": list(self.names)}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Task:
        """The task ``to_dict`` wrote; a ConfigError naming what is missing otherwise."""
        if not isinstance(value, dict) or "kind" not in value or "names" not in value:
            raise ConfigError(f"a task is recorded as {{kind: ..., names: [...]}}, not {value!r}")
        return cls(value["kind"], tuple(value["names"]))

    @classmethod
    def multiclass(cls, names: Sequence[str]) -> Task:
        """The task of the classic data sets (CIFAR, SVHN, ImageNet, folders): one class per image."""
        return cls("multiclass", tuple(names))


def positive_weight(task: Task, targets) -> torch.Tensor:
    """Per output, negatives / positives in the training targets: BCE's ``pos_weight`` that weighs each label's
    positives as much as its negatives. A label with no positive gets 1 (nothing to weigh up)."""
    import torch

    if task.kind == "multiclass":
        raise ConfigError("pos_weight is for binary and multilabel tasks; this one is multiclass")
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float64).reshape(len(targets), -1)
    if y.shape[1] != task.num_outputs:
        raise ConfigError(f"targets have {y.shape[1]} columns; the {task.kind} task has {task.num_outputs}")
    positives = y.sum(0)
    negatives = y.shape[0] - positives
    return torch.where(positives > 0, negatives / positives.clamp_min(1), torch.ones_like(positives)).float()


def infer_task(labels, names: Sequence[str] | None = None, source: str = "labels") -> Task:
    """The task a label array describes: (N,) or (N, 1) integers -> binary when they take at most two values
    (0/1) and ``names`` has no more than two, else multiclass (ordinal grades too); (N, L > 1) of 0/1 ->
    multilabel. ``names`` (optional) names the classes or labels; default "0".."n-1". ``source`` names the
    file or key in the ConfigError a malformed array raises."""
    y = np.asarray(labels)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] == 0:
        raise ConfigError(f"{source}: labels must be (N,) or (N, L) with N > 0, not shape {tuple(np.shape(labels))}")
    if not np.issubdtype(y.dtype, np.number):
        raise ConfigError(f"{source}: labels must be numbers, not {y.dtype}")
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
        bad = y[~np.isfinite(y) | (y != np.round(y))].ravel()[0]
        raise ConfigError(f"{source}: labels must be whole numbers (class indices or 0/1), found {bad}")
    if y.min() < 0:
        raise ConfigError(f"{source}: labels must be >= 0, found {int(y.min())}")
    if y.shape[1] > 1:
        if y.max() > 1:
            raise ConfigError(f"{source}: a (N, {y.shape[1]}) label array is multi-label and must hold 0/1, "
                              f"found {int(y.max())}")
        label_names = tuple(names) if names is not None else tuple(str(i) for i in range(y.shape[1]))
        if len(label_names) != y.shape[1]:
            raise ConfigError(f"{source}: {y.shape[1]} label columns but {len(label_names)} names")
        return Task("multilabel", label_names)
    count = int(y.max()) + 1
    if names is not None:
        if len(names) < count:
            raise ConfigError(f"{source}: class index {count - 1} found but only {len(names)} names "
                              f"({', '.join(map(str, names))})")
        count = len(names)
    count = max(count, 2)
    class_names = tuple(names) if names is not None else tuple(str(i) for i in range(count))
    return Task("binary" if count == 2 else "multiclass", class_names)


def targets_array(task: Task, labels) -> np.ndarray:
    """Labels as a Split stores them for ``task``: int64 (N,) or float32 (N, L)."""
    y = np.asarray(labels)
    if task.kind == "multilabel":
        return np.ascontiguousarray(y.reshape(len(y), -1), dtype=np.float32)
    return np.ascontiguousarray(y.reshape(-1), dtype=np.int64)
