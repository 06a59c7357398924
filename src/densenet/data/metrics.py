"""The measures of a task, from targets and probabilities, computed by scikit-learn.

    from densenet.data.metrics import compute_metrics, selection_metric
    values = compute_metrics(task, targets, probs)     # numpy (or torch on the CPU) arrays
    values["auroc"], values["map"], values["acc"]      # binary / multilabel
    name, higher_is_better = selection_metric(task)    # ("auroc", True) or ("error", False)

One flat dict of floats per call, with the same keys for every call of a task kind, so metrics.csv columns,
``evaluate --json`` and reports read them by name:

- every kind: ``error`` (percent; multiclass: top-1; binary: 100 (1 - acc); multilabel: images with any label
  wrong, i.e. 100 (1 - subset accuracy)), ``acc`` (0..1), ``auroc`` (mean over the labels scored);
- multiclass: ``top5_error`` (percent; 0 with five classes or fewer, as a top-5 over them always hits), and
  ``auroc`` one-vs-rest, macro-averaged, when every class occurs in the targets (NaN otherwise);
- binary and multilabel (the binary task is its positive class as one label): ``auroc/<label>`` and
  ``ap/<label>`` per label, ``map`` (mean average precision over the labels scored), ``acc`` as MedMNIST
  defines it (the fraction of label entries right at the threshold), ``hamming`` (scikit-learn's Hamming
  loss, 1 - acc), ``f1_macro`` and ``f1_micro`` at the threshold (multilabel: over the labels; binary:
  scikit-learn's binary meaning, macro over the two classes, micro = acc, plus ``f1`` of the positive class),
  ``auroc_skipped`` (labels left out of ``auroc`` and ``map`` because the targets hold one value only for
  them; their ``auroc/`` and ``ap/`` are NaN);
- multilabel: ``lrap``, scikit-learn's label-ranking average precision (the "average precision" of the
  multi-label literature).

Which measure picks a checkpoint on validation data is ``selection_metric``: AUROC for binary and multilabel
tasks (independent of a threshold, MedMNIST's first measure), the error for multiclass ones. Per-label
operating thresholds (torchxrayvision keeps them with the weights) come from ``choose_thresholds`` on
validation data; the threshold-based measures above use 0.5 unless given others.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from densenet.data.task import Task


class Selection(NamedTuple):
    """The key of ``compute_metrics`` that chooses the best checkpoint, and which way is better."""

    name: str
    higher_is_better: bool

    def better(self, new: float, old: float) -> bool:
        """Whether ``new`` beats ``old`` (NaN never does; anything beats NaN)."""
        if math.isnan(new):
            return False
        if math.isnan(old):
            return True
        return new > old if self.higher_is_better else new < old

    @property
    def worst(self) -> float:
        """A value every real one beats: the starting point of a search for the best epoch."""
        return -math.inf if self.higher_is_better else math.inf


def selection_metric(task: Task) -> Selection:
    """("auroc", higher is better) for binary and multilabel tasks, ("error", lower is better) for multiclass."""
    return Selection("error", False) if task.kind == "multiclass" else Selection("auroc", True)


def metric_keys(task: Task) -> list[str]:
    """The keys ``compute_metrics`` returns for ``task``, in a stable order (for CSV columns)."""
    if task.kind == "multiclass":
        return ["error", "top5_error", "acc", "auroc"]
    keys = ["error", "acc", "auroc", "map", "hamming", "f1_macro", "f1_micro", "auroc_skipped"]
    keys.append("lrap" if task.kind == "multilabel" else "f1")
    keys += [f"auroc/{name}" for name in task.label_names] + [f"ap/{name}" for name in task.label_names]
    return keys


def compute_metrics(task: Task, targets, probs, threshold: float | np.ndarray = 0.5) -> dict[str, float]:
    """The measures of ``task`` (see the module's docstring) from the targets as a Split stores them and the
    probabilities ``Task.probabilities`` gives ((N, C) multiclass, (N, 1) or (N,) binary, (N, L) multilabel)."""
    y = _numpy(targets)
    p = _numpy(probs).astype(np.float64)
    if len(y) != len(p):
        raise ValueError(f"{len(y)} targets but {len(p)} rows of probabilities")
    if len(y) == 0:
        raise ValueError("no targets to measure")
    if task.kind == "multiclass":
        return _multiclass(y.reshape(-1).astype(np.int64), p.reshape(len(p), -1))
    if task.kind == "binary":
        if p.ndim == 2 and p.shape[1] == 2:  # a softmax over (negative, positive)
            p = p[:, 1]
        y, p = y.reshape(-1, 1), p.reshape(-1, 1)
    return _per_label(task, y.reshape(len(y), -1).astype(np.int64), p.reshape(len(p), -1), threshold)


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _multiclass(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, roc_auc_score, top_k_accuracy_score

    classes = p.shape[1]
    acc = float(accuracy_score(y, p.argmax(1)))
    top5 = 1.0 if classes <= 5 else float(top_k_accuracy_score(y, p, k=5, labels=np.arange(classes)))
    auroc = math.nan
    if classes >= 2 and np.unique(y).size == classes:
        if classes == 2:
            auroc = float(roc_auc_score(y, p[:, 1]))
        else:  # scikit-learn wants rows that sum to 1: renormalise what float32 softmax left slightly off
            auroc = float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro"))
    return {"error": 100.0 * (1.0 - acc), "top5_error": 100.0 * (1.0 - top5), "acc": acc, "auroc": auroc}


def _per_label(task: Task, y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        hamming_loss,
        label_ranking_average_precision_score,
        roc_auc_score,
    )

    names = task.label_names
    if y.shape[1] != len(names) or p.shape[1] != len(names):
        raise ValueError(f"the {task.kind} task has {len(names)} labels; targets have {y.shape[1]} columns and "
                         f"probabilities {p.shape[1]}")
    decided = (p > threshold).astype(np.int64)
    out: dict[str, float] = {}
    aurocs, aps = {}, {}
    for j, name in enumerate(names):
        scored = np.unique(y[:, j]).size == 2  # AUROC and AP need positives and negatives both
        aurocs[name] = float(roc_auc_score(y[:, j], p[:, j])) if scored else math.nan
        aps[name] = float(average_precision_score(y[:, j], p[:, j])) if scored else math.nan
    kept = [name for name in names if not math.isnan(aurocs[name])]
    acc = float(np.mean(decided == y))
    out["error"] = 100.0 * (1.0 - (acc if task.kind == "binary" else float(accuracy_score(y, decided))))
    out["acc"] = acc
    out["auroc"] = float(np.mean([aurocs[n] for n in kept])) if kept else math.nan
    out["map"] = float(np.mean([aps[n] for n in kept])) if kept else math.nan
    if task.kind == "binary":  # scikit-learn's binary meanings: macro over both classes; "f1" of the positive one
        y, decided = y.ravel(), decided.ravel()
        out["f1"] = float(f1_score(y, decided, average="binary", zero_division=0))
    out["hamming"] = float(hamming_loss(y, decided))
    out["f1_macro"] = float(f1_score(y, decided, average="macro", zero_division=0))
    out["f1_micro"] = float(f1_score(y, decided, average="micro", zero_division=0))
    out["auroc_skipped"] = float(len(names) - len(kept))
    if task.kind == "multilabel":
        out["lrap"] = float(label_ranking_average_precision_score(y, p))
    out.update({f"auroc/{n}": aurocs[n] for n in names})
    out.update({f"ap/{n}": aps[n] for n in names})
    return {key: out[key] for key in metric_keys(task)}


def choose_thresholds(task: Task, targets, probs, rule: str = "youden") -> np.ndarray:
    """One operating threshold per output, chosen on validation data (never on test), for ``Task.predict``.

    ``rule``: "youden" (the ROC point of the largest sensitivity + specificity - 1, scikit-learn's
    ``roc_curve``) or "f1" (the largest F1, from ``precision_recall_curve``). A label with a single class in
    the targets keeps 0.5. The thresholds are set just below the chosen score, so that ``probs > threshold``
    (``Task.predict``) decides as scikit-learn's ``probs >= score`` does.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if task.kind == "multiclass":
        raise ValueError("thresholds are for binary and multilabel tasks; a multiclass task takes the argmax")
    if rule not in ("youden", "f1"):
        raise ValueError(f"rule must be 'youden' or 'f1', not {rule!r}")
    p = _numpy(probs).astype(np.float64)
    if task.kind == "binary" and p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    y = _numpy(targets).reshape(len(p), -1).astype(np.int64)
    p = p.reshape(len(p), -1)
    out = np.full(p.shape[1], 0.5)
    for j in range(p.shape[1]):
        if np.unique(y[:, j]).size < 2:
            continue
        if rule == "youden":
            fpr, tpr, scores = roc_curve(y[:, j], p[:, j])
            best = scores[np.argmax(tpr - fpr)]
        else:
            precision, recall, scores = precision_recall_curve(y[:, j], p[:, j])
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            best = scores[np.argmax(f1)]
        if np.isfinite(best):
            out[j] = np.nextafter(best, -np.inf)
    return out
