"""What a training run does differently per task (``densenet.data.task``): loss, columns, selection, the final test.

    loss_fn = build_loss(options, data, device)          # None for multiclass: the cross-entropy of today
    best = initial_best(data.task, has_val=data.val is not None)
    row |= result_columns(data.task, results)            # val_auroc, val_acc, ..., in metric_keys' order
    if improved(best, row): best = chosen(best, row)

Multiclass runs are what they always were: cross-entropy (with --label-smoothing), top-1 and top-5 error every
evaluated epoch on the test split (and the validation split where there is one, SVHN: the best checkpoint is the
epoch with the lowest validation error). Binary and multilabel runs (MedMNIST, CSV-labelled sets) follow the rule
of medical-imaging benchmarks, *selection on validation, test once*:

- the loss is BCE with logits, with ``pos_weight`` = negatives / positives per label (``--pos-weight auto``,
  ``densenet.data.task.positive_weight`` on the training targets) or none;
- where the data have a validation split, only it is evaluated after each epoch (``val_*`` columns of
  metrics.csv: loss, error and ``densenet.data.metrics.metric_keys``) and the best checkpoint is the epoch with
  the highest validation AUROC (``selection_metric``); at the end the test split is evaluated once, on those
  weights, and RUN/results.json holds the selected epoch with its validation and test measures;
- per-label thresholds (Youden's J on the validation probabilities of the chosen weights, ``choose_thresholds``)
  go into the weights' metadata for ``densenet predict``; the measures reported use 0.5, as MedMNIST's ACC does;
- without a validation split the test split is evaluated each epoch, as for multiclass, and nothing is chosen on
  it: the final epoch's weights are the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from densenet.data.metrics import choose_thresholds, metric_keys, selection_metric
from densenet.data.splits import Data
from densenet.data.task import Task, positive_weight
from densenet.errors import ConfigError
from densenet.files import atomic_write, figure_png

RESULTS = "results.json"
SPLIT = "split.csv"
THRESHOLD_RULE = "youden"
# Shown in the log and the report, in this order, where the task has them.
SHOWN = (("auroc", "AUROC"), ("acc", "ACC"), ("map", "mAP"), ("lrap", "LRAP"), ("hamming", "Hamming"),
         ("f1_macro", "F1"))


def model_shape(data: Data) -> dict[str, int]:
    """The ``create_model`` arguments the data decide: outputs (``task.num_outputs``: 1 for binary), input
    channels, and ``spatial_dims`` for signals and volumes (only then: the comparison ResNets are 2D only and
    refuse it)."""
    shape = {"num_classes": data.task.num_outputs, "in_chans": data.in_chans}
    if data.spatial_dims != 2:
        shape["spatial_dims"] = data.spatial_dims
    return shape


def build_loss(data: Data, device: torch.device, label_smoothing: float = 0.0, pos_weight: str = "none"
               ) -> Callable | None:
    """The task's training loss on ``device``; None for multiclass (train_one_epoch's cross-entropy, unchanged).

    ``pos_weight``: "auto" weighs each label's positives by negatives / positives in the training targets
    (imbalance, e.g. PneumoniaMNIST's 3:1), "none" leaves BCE unweighted."""
    task = data.task
    if pos_weight not in ("none", "auto"):
        raise ConfigError(f"--pos-weight must be none or auto, not {pos_weight!r}")
    if task.kind == "multiclass":
        if pos_weight != "none":
            raise ConfigError("--pos-weight auto is for binary and multilabel tasks; this one is multiclass")
        return None
    weight = positive_weight(task, data.train.labels) if pos_weight == "auto" else None
    return task.loss(label_smoothing, weight).to(device)


def evaluated_splits(task: Task, splits: list[str]) -> list[str]:
    """The splits evaluated after each epoch: all of them for multiclass (as always); validation only for binary
    and multilabel where there is one (the test split is evaluated once, at the end, on the chosen weights)."""
    if task.kind != "multiclass" and "val" in splits:
        return ["val"]
    return list(splits)


def initial_best(task: Task, has_val: bool) -> dict[str, Any]:
    """Where the search for the best epoch starts: the metric (a metrics.csv column), its worst value, which way
    is better. Multiclass: the lowest val_error, else test_error, as always. Binary and multilabel: the highest
    val_auroc; with no validation split nothing is chosen (metric None: the final epoch is the model)."""
    if task.kind == "multiclass":
        return {"metric": "val_error" if has_val else "test_error", "value": math.inf, "epoch": 0}
    if not has_val:
        return {"metric": None, "value": math.nan, "epoch": 0, "higher_is_better": True}
    selection = selection_metric(task)
    return {"metric": f"val_{selection.name}", "value": selection.worst, "epoch": 0,
            "higher_is_better": selection.higher_is_better}


def improved(best: dict[str, Any], row: dict[str, float]) -> bool:
    """Whether this epoch's ``row`` beats ``best`` (a checkpoint's ``best`` from before tasks lowers the error)."""
    key = best.get("metric")
    if key is None or key not in row:
        return False
    value = float(row[key])
    if math.isnan(value):
        return False
    if best.get("higher_is_better"):
        return math.isnan(best["value"]) or value > best["value"]
    return value < best["value"]


def chosen(best: dict[str, Any], row: dict[str, float]) -> dict[str, Any]:
    """``best`` moved to ``row``'s epoch."""
    return {**best, "value": float(row[best["metric"]]), "epoch": int(row["epoch"])}


def result_columns(task: Task, results: dict[str, Any]) -> dict[str, float]:
    """The metrics.csv columns of one epoch's evaluations (``engine.Stats`` per split name).

    Multiclass: test_error, test_top5_error, val_error, as always. Binary and multilabel, per split evaluated:
    ``<split>_loss``, then ``<split>_<key>`` for every ``metric_keys(task)`` key (error, acc, auroc, map, ...)."""
    row: dict[str, float] = {}
    if task.kind == "multiclass":
        if "test" in results:
            row |= {"test_error": results["test"].error, "test_top5_error": results["test"].top5_error}
        if "val" in results:
            row["val_error"] = results["val"].error
        return row
    for name in ("val", "test"):
        if name in results:
            row[f"{name}_loss"] = results[name].loss
            row |= {f"{name}_{key}": results[name].metrics.get(key, math.nan) for key in metric_keys(task)}
    return row


def describe(values: dict[str, float], prefix: str = "") -> str:
    """'AUROC 0.953  ACC 0.884  mAP 0.97' from ``values`` (keys ``prefix + key``), the keys the task has."""
    parts = []
    for key, label in SHOWN:
        value = values.get(prefix + key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{label} {value:.4f}")
    return "  ".join(parts)


def epoch_summary(row: dict[str, float]) -> str:
    """The validation (else test) measures of a binary or multilabel epoch for its log line."""
    for name, label in (("val", "val"), ("test", "test")):
        if f"{name}_auroc" in row:
            return f"  {label} {describe(row, name + '_')}"
    return ""


def finish(data: Data, run_dir: Path, history: list[dict], best: dict[str, Any], model: torch.nn.Module,
           measure: Callable[[str, Any], Any], is_main: bool, say: Callable[[str], None]
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Select on validation, test once: the summary of a binary or multilabel run and what the weights' metadata
    gains (thresholds). ``model`` already holds the weights to keep (the best epoch's where there is a validation
    split, loaded by the caller); ``measure(split, threshold)`` evaluates it on one split (``engine.Stats``).

    Writes RUN/results.json (main process only) and says the selection and the test measures, labelled."""
    task = data.task
    selected = best["epoch"] if best.get("metric") and best["epoch"] else int(history[-1]["epoch"])
    results: dict[str, Any] = {"task": task.to_dict(), "selected_epoch": selected,
                               "selected_by": best.get("metric") or "final epoch (no validation split)"}
    extra: dict[str, Any] = {}
    if data.val is not None:
        val = measure("val", 0.5)
        thresholds = choose_thresholds(task, *val.outputs, rule=THRESHOLD_RULE)
        extra = {"thresholds": [round(float(t), 6) for t in thresholds], "threshold_rule": THRESHOLD_RULE}
        results["val"] = _plain(val.metrics) | {"loss": _number(val.loss), "n": val.n}
        results |= extra
    test = measure("test", 0.5)
    results["test"] = _plain(test.metrics) | {"loss": _number(test.loss), "n": test.n}
    results["model"] = str(run_dir / "model.safetensors")
    if is_main:
        text = json.dumps(results, indent=2, allow_nan=False) + "\n"
        atomic_write(run_dir / RESULTS, lambda f: f.write(text.encode()))
        if "val" in results:
            say(f"selected epoch {selected} by validation {best['metric'].removeprefix('val_')} "
                f"(val {describe(test_free(results['val']))}); test, evaluated once on it: "
                f"{describe(test_free(results['test']))}; thresholds (Youden, on val) in the weights' metadata")
        else:
            say(f"no validation split: the final epoch ({selected}) is the model; test: "
                f"{describe(test_free(results['test']))}")
    summary = {"run_dir": str(run_dir), "epoch": selected, "test_error": results["test"].get("error"),
               "test_top5_error": None, "task": task.kind, "selected_by": results["selected_by"],
               "val": results.get("val"), "test": results["test"]}
    return summary, extra


def test_free(values: dict[str, Any]) -> dict[str, float]:
    """The measures of a results.json split as floats (None, JSON's NaN, skipped)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_task_curves(run_dir: Path, history: list[dict[str, float]], title: str) -> None:
    """RUN/curves.png of a binary or multilabel run: the train and validation (test) error at probability 0.5
    against epoch, and the validation (test) AUROC against epoch, the measure that selects the epoch (marked)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax, ax_auc) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax.plot(epochs, [row["train_error"] for row in history], label="train error")
    for name, label in (("val", "validation"), ("test", "test")):
        points = [(row["epoch"], row[f"{name}_error"], row.get(f"{name}_auroc", math.nan)) for row in history
                  if f"{name}_error" in row]
        if points:
            sparse = len(points) < len(epochs)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if sparse else None,
                    label=f"{label} error")
            ax_auc.plot([p[0] for p in points], [p[2] for p in points], marker="." if sparse else None,
                        label=f"{label} AUROC")
    valued = [(row["epoch"], row["val_auroc"]) for row in history
              if "val_auroc" in row and not math.isnan(row["val_auroc"])]
    if valued:
        epoch, value = max(valued, key=lambda p: p[1])
        ax_auc.plot([epoch], [value], "o", color="C1")
        left = epoch <= (epochs[0] + epochs[-1]) / 2  # write the label towards the middle, inside the axes
        ax_auc.annotate(f"selected: epoch {epoch}, {value:.4f}", (epoch, value), textcoords="offset points",
                        xytext=(8 if left else -8, -14), ha="left" if left else "right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error at 0.5 (%)")
    ax.set_title(title)
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("AUROC (mean over labels)")
    ax_auc.set_title("AUROC against epoch")
    for axis in (ax, ax_auc):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    png = figure_png(fig)
    atomic_write(run_dir / "curves.png", lambda f: f.write(png))


def write_split(run_dir: Path, data: Data) -> None:
    """RUN/split.csv: the split the loader drew from the seed (``Data.assignment``), to reproduce it."""
    if data.assignment:
        from densenet.data.labelled import write_split_csv

        write_split_csv(run_dir / SPLIT, data.assignment)


def split_file(run_dir: Path | str | None) -> Path | None:
    """A run folder's split.csv, when it has one: what a resumed run and ``densenet evaluate`` load the data by."""
    if run_dir is None:
        return None
    path = Path(run_dir)
    path = (path if path.is_dir() else path.parent) / SPLIT
    return path if path.is_file() else None


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """RUN/results.json (the selected epoch, its validation and test measures), or None."""
    try:
        value = json.loads((Path(run_dir) / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _plain(metrics: dict[str, float]) -> dict[str, float | None]:
    """Measures for JSON: NaN (a label with one class in the split) as null."""
    return {k: _number(v) for k, v in metrics.items()}
