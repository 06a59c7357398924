"""``densenet report RUN_DIR... [--out DIR]``: training runs as the paper's Tables 2 and 3, and its plots.

    densenet report runs/digits docs/runs/cifar10-densenet40_k12 --out docs/results

For each run folder (config.yaml, metrics.csv, model.safetensors or a checkpoint): the model, its
parameters and multiply-accumulates (``densenet.analysis.complexity``, at the run's input size), our
test error, the paper's and the difference, as a Markdown table (printed, and DIR/report.md). With
--out, also DIR/report.png: error against parameters and against MACs (the paper's Figures 3 and 4,
left), our runs beside the paper's reported points for the same data sets.

Our error is the last epoch's test error (the paper's CIFAR and ImageNet protocol), or, where the run
has a validation column (SVHN), the test error of the epoch with the lowest validation error. The
paper's error comes from the run's recipe (``paper_error:``) or else from ``PAPER_ERRORS`` below.

Binary and multilabel runs (config.yaml's ``task``: MedMNIST, CSV-labelled sets) are measured by AUROC, ACC,
mAP (and LRAP, Hamming loss for multilabel), labelled val and test, in a table of their own: the run's
results.json (the epoch selected on validation AUROC, its validation measures and the test measures evaluated
once on it), or, for a run without a validation split, metrics.csv's last evaluated epoch. Their "error" in
the plot is the test error at probability 0.5 (100 (1 - subset accuracy); binary: 100 (1 - ACC)).
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from densenet.data.registry import DATASETS
from densenet.errors import DenseNetError
from densenet.files import figure_png

# (model, data set, augmentation) -> the paper's test error in percent (Table 2; ImageNet: Table 3 single-crop top-1).
PAPER_ERRORS: dict[tuple[str, str, str], float] = {}
for _model, _errors in {
    "densenet40_k12": (7.00, 5.24, 27.55, 24.42, 1.79),
    "densenet100_k12": (5.77, 4.10, 23.79, 20.20, 1.67),
    "densenet100_k24": (5.83, 3.74, 23.42, 19.25, 1.59),
    "densenet_bc100_k12": (5.92, 4.51, 24.15, 22.27, 1.76),
    "densenet_bc250_k24": (5.19, 3.62, 19.64, 17.60, 1.74),
    "densenet_bc190_k40": (None, 3.46, None, 17.18, None),
}.items():
    for _key, _error in zip((("cifar10", "none"), ("cifar10", "standard"), ("cifar100", "none"),
                             ("cifar100", "standard"), ("svhn", "none")), _errors, strict=True):
        if _error is not None:
            PAPER_ERRORS[(_model, *_key)] = _error
PAPER_ERRORS.update({("densenet121", "imagenet", "standard"): 25.02, ("densenet169", "imagenet", "standard"): 23.80,
                     ("densenet201", "imagenet", "standard"): 22.58, ("densenet264", "imagenet", "standard"): 22.15})


def paper_label(dataset: str, augment: str) -> str:
    """The paper's column name: C10+, C100, SVHN, ImageNet, ... (our name for other data sets)."""
    record = DATASETS.get(dataset)
    if record is None:
        return dataset
    # The paper marks augmentation with "+" where it compares both (CIFAR); SVHN and ImageNet have one protocol.
    return record.label + ("+" if augment == "standard" and record.name.startswith("cifar") else "")


@dataclass
class RunResult:
    run: str
    model: str
    dataset: str
    augment: str
    epochs_done: int
    epochs_planned: int
    train_subset: int | None  # a run on part of the training set says so
    params: int
    macs: int
    error: float
    error_rule: str  # which epoch's test error
    paper_error: float | None
    task: str = "multiclass"
    # binary and multilabel runs: "val" and "test" measures of the reported epoch (auroc, acc, map, ...)
    measures: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def difference(self) -> float | None:
        return None if self.paper_error is None else self.error - self.paper_error


def read_run(run_dir: str | Path) -> RunResult:
    """One run folder's row: its configuration, final (or best-validation) error and the model's size."""
    from densenet.analysis.complexity import count_parameters
    from densenet.models.weights import load_weights

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DenseNetError(f"run folder {run_dir} does not exist")
    for name in ("config.yaml", "metrics.csv"):
        if not (run_dir / name).is_file():
            raise DenseNetError(f"{run_dir} is not a finished run folder: it has no {name}")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise DenseNetError(f"{run_dir / 'config.yaml'} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    with open(run_dir / "metrics.csv", newline="") as f:
        every = list(csv.DictReader(f))
    task = config["task"].get("kind", "multiclass") if isinstance(config.get("task"), dict) else "multiclass"
    measures: dict[str, dict[str, float]] = {}
    if task != "multiclass":
        error, rule, measures = _task_measures(run_dir, every)
    else:
        error, rule = _multiclass_error(run_dir, every)
    model, metadata = load_weights(run_dir)
    dataset = str(config.get("dataset") or metadata.get("dataset") or "?")
    augment = str(config.get("augment") or "?")
    name = str(config.get("model") or metadata.get("model"))
    paper = (config.get("info") or {}).get("paper_error")
    if paper is None:
        paper = PAPER_ERRORS.get((name, dataset, augment))
    input_size = metadata.get("input_size") or config.get("input_size")
    subset = config.get("train_subset")
    done = len(every)
    return RunResult(run_dir.name, name, dataset, augment, done, int(config.get("epochs") or done),
                     int(subset) if subset else None,
                     count_parameters(model), _forward_macs(model, input_size), error, rule,
                     None if paper is None else float(paper), task, measures)


def _forward_macs(model, input_size: int | None) -> int:
    """Multiply-accumulates of one image's forward pass: the paper's count for a 2D DenseNet (analysis/complexity.py),
    torch's operator count for a 1D/3D DenseNet or another network (a comparison ResNet of the paper's Figure 4)."""
    from densenet.analysis.complexity import count_macs
    from densenet.models.densenet import DenseNet

    dims = int(model.config.get("spatial_dims", 2))
    if isinstance(model, DenseNet) and dims == 2:
        return count_macs(model, input_size)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = input_size or 32
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, int(model.config.get("in_chans", 3)), *[size] * dims))
    return counter.get_total_flops() // 2


def _multiclass_error(run_dir: Path, every: list[dict[str, str]]) -> tuple[float, str]:
    """The last epoch's test error, or the test error of the epoch with the lowest validation error."""
    rows = [row for row in every if row.get("test_error") not in (None, "")]  # --eval-every skips some epochs
    if not rows:
        raise DenseNetError(f"{run_dir / 'metrics.csv'} has no finished epoch with a test_error")
    try:
        if any(row.get("val_error") not in (None, "") for row in rows):
            chosen = min(rows, key=lambda row: float(row["val_error"]))
            rule = f"epoch {chosen['epoch']} (lowest validation error)"
        else:
            chosen, rule = rows[-1], f"epoch {rows[-1]['epoch']} (last)"
        error = float(chosen["test_error"])
    except (KeyError, ValueError) as exc:
        raise DenseNetError(f"{run_dir / 'metrics.csv'} has a malformed row: {exc}") from exc
    return error, rule


def _task_measures(run_dir: Path, every: list[dict[str, str]]) -> tuple[float, str, dict[str, dict[str, float]]]:
    """A binary or multilabel run's test error at 0.5, which epoch, and its val and test measures: results.json
    (selected on validation, tested once), else metrics.csv's last epoch with test measures."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict) and isinstance(results.get("test"), dict):
        measures = {split: _floats(results[split]) for split in ("val", "test") if isinstance(results.get(split), dict)}
        by = str(results.get("selected_by", "")).removeprefix("val_")
        rule = (f"epoch {results.get('selected_epoch')} (highest validation {by}; test evaluated once on it)"
                if "val" in measures else f"epoch {results.get('selected_epoch')} (last; no validation split)")
        return measures["test"].get("error", math.nan), rule, measures
    rows = [row for row in every if row.get("test_auroc") not in (None, "")]
    if not rows:
        raise DenseNetError(f"{run_dir} has no results.json and its metrics.csv no epoch with test measures "
                            f"(was the run stopped before its end?)")
    last = rows[-1]
    measures = {split: _floats({k.removeprefix(split + "_"): v for k, v in last.items() if k.startswith(split + "_")})
                for split in ("val", "test") if any(k.startswith(split + "_") for k in last)}
    return measures["test"].get("error", math.nan), f"epoch {last['epoch']} (last)", measures


def _floats(values: dict) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        try:
            out[key] = math.nan if value in (None, "") else float(value)
        except (TypeError, ValueError):
            continue
    return out


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _macs(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.2f}M"


TASK_COLUMNS = (("auroc", "AUROC"), ("acc", "ACC"), ("map", "mAP"), ("lrap", "LRAP"), ("hamming", "Hamming"))


def task_markdown(results: list[RunResult]) -> str:
    """The binary and multilabel runs: validation and test AUROC, ACC, mAP (LRAP, Hamming for multilabel)."""
    header = "| run | model | data | task | epochs | params | " + " | ".join(
        f"{split} {label}" for split in ("val", "test") for _, label in TASK_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (6 + 2 * len(TASK_COLUMNS))]
    for r in results:
        cells = []
        for split in ("val", "test"):
            values = r.measures.get(split, {})
            cells += ["–" if math.isnan(values.get(key, math.nan)) else f"{values[key]:.4f}" for key, _ in TASK_COLUMNS]
        epochs = f"{r.epochs_done}" + (f" of {r.epochs_planned}" if r.epochs_done != r.epochs_planned else "")
        lines.append(f"| {r.run} | {r.model} | {paper_label(r.dataset, r.augment)} | {r.task} | {epochs} "
                     f"| {_millions(r.params)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Reported epoch: " + "; ".join(f"{r.run}: {r.error_rule}" for r in results) + ". ACC at "
                 "probability 0.5 over every label entry (MedMNIST's); AUROC and mAP averaged over the labels; "
                 "LRAP: label-ranking average precision (multilabel).")
    return "\n".join(lines) + "\n"


def markdown(results: list[RunResult]) -> str:
    tasks = [r for r in results if r.task != "multiclass"]
    if tasks:
        rest = [r for r in results if r.task == "multiclass"]
        return (markdown(rest) + "\n" if rest else "") + task_markdown(tasks)
    lines = ["| run | model | data | epochs | params | MACs | our error (%) | paper (%) | difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        epochs = f"{r.epochs_done}" + (f" of {r.epochs_planned}" if r.epochs_done != r.epochs_planned else "")
        epochs += f" on {r.train_subset:,} images" if r.train_subset else ""
        paper = "–" if r.paper_error is None else f"{r.paper_error:.2f}"
        diff = "–" if r.difference is None else f"{r.difference:+.2f}"
        lines.append(f"| {r.run} | {r.model} | {paper_label(r.dataset, r.augment)} | {epochs} | {_millions(r.params)} "
                     f"| {_macs(r.macs)} | {r.error:.2f} | {paper} | {diff} |")
    lines.append("")
    lines.append("Our error: test error of " + "; ".join(f"{r.run}: {r.error_rule}" for r in results) + ". "
                 "Paper: Table 2 (CIFAR, SVHN; C10+ = standard augmentation, 300 epochs) or Table 3 (ImageNet, "
                 "single-crop top-1). MACs: convolutions and the linear layer, one image at the run's input size.")
    return "\n".join(lines) + "\n"


@functools.cache
def model_size(name: str, num_classes: int) -> tuple[int, int]:
    """(parameters, MACs at the paper's input size) of a named model, from its configuration."""
    from densenet.analysis.complexity import config_macs, config_parameters
    from densenet.models.registry import model_config

    config = model_config(name) | {"num_classes": num_classes}
    return config_parameters(config), config_macs(config)


def paper_points(dataset: str, augment: str) -> list[tuple[str, int, int, float]]:
    """(model, params, MACs, error) of the paper's reported rows for one data set and augmentation."""
    return [(name, *model_size(name, DATASETS[ds].num_classes), error)
            for (name, ds, aug), error in PAPER_ERRORS.items() if (ds, aug) == (dataset, augment)]


def plot(results: list[RunResult]) -> bytes:
    """Error against parameters and against MACs (the paper's Figures 3 and 4, left), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    groups = sorted({(r.dataset, r.augment) for r in results})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (dataset, augment) in enumerate(groups):
        colour, label = colours[i % len(colours)], paper_label(dataset, augment)
        ours = [r for r in results if (r.dataset, r.augment) == (dataset, augment)]
        paper = paper_points(dataset, augment)
        for ax, index in ((axes[0], 1), (axes[1], 2)):
            if paper:
                xs = sorted(paper, key=lambda p: p[index])
                ax.plot([p[index] for p in xs], [p[3] for p in xs], "o--", mfc="none", color=colour, alpha=0.7,
                        label=f"paper, {label}")
                for j, p in enumerate(xs):  # alternate above and below: neighbours on a log axis crowd
                    ax.annotate(p[0].replace("densenet", "DN"), (p[index], p[3]), fontsize=7, alpha=0.7,
                                xytext=(3, 4 if j % 2 else -10), textcoords="offset points")
            size = [r.params if index == 1 else r.macs for r in ours]
            ax.plot(size, [r.error for r in ours], "*", ms=12, color=colour, label=f"ours, {label}")
            for r, x in zip(ours, size, strict=True):
                ax.annotate(f"{r.model} ({r.epochs_done} ep)", (x, r.error), fontsize=8, xytext=(4, -10),
                            textcoords="offset points")
    for ax, xlabel in zip(axes, ("parameters", "multiply-accumulates per image"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_title("error against parameters")
    axes[1].set_title("error against MACs")
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def write_report(results: list[RunResult], out_dir: str | Path, command: str = "") -> tuple[Path, Path]:
    from densenet.files import atomic_write

    out_dir = Path(out_dir)
    text = markdown(results)
    png = plot(results)
    header = f"Made by `{command}`.\n\n" if command else ""
    body = f"{header}{text}\n![error against parameters and MACs](report.png)\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "report.png", lambda f: f.write(png))
        atomic_write(out_dir / "report.md", lambda f: f.write(body.encode()))
    except OSError as exc:
        raise DenseNetError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return out_dir / "report.md", out_dir / "report.png"
