"""The paper's Figure 4 from run folders: DenseNet variants against ResNets under one training protocol.

    densenet analyze figure4 runs/figure4/* --out docs/figure4

For each run folder (config.yaml and metrics.csv as ``densenet train`` writes them; no weights needed): the
network, its family (DenseNet, -B, -C, -BC; ResNet, pre-activation ResNet), parameters and forward
multiply-accumulates per image, the run's throughput (training images per wall-clock second, evaluation
included), its wall-clock minutes and its final test error. Written to DIR:

- ``figure4.png``: test error against parameters, against forward MACs and against wall-clock minutes, one
  marker per network, shape and colour by family (the paper's Figure 4 left and middle, plus time on this CPU);
- ``curves.png``: the training and test curves of the best DenseNet-BC beside the ResNet whose test error is
  closest to it (the paper's Figure 4 right: a 0.8M DenseNet-BC-100 against a 10.2M pre-activation ResNet-1001);
- ``figure4.md``: the table (network, params, MACs, img/s, minutes, test error, and the fp32 matmul peak
  measured before and after each run where its train.log has them: scripts/figure4.sh writes them), the CPU
  each run trained on, what differs between the runs' recipes (a fair comparison needs none but the model),
  and the command that made it.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a shape-only (meta) copy of the network,
one image at the run's input size: convolutions and linear layers, half their FLOPs, so BN, ReLU, pooling and
additions are free, the paper's convention and complexity.py's (the tests check both agree on a DenseNet). One
counter for both families, so neither is counted by a rule written for it alone.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from densenet.data.registry import DATASETS
from densenet.errors import DenseNetError
from densenet.files import figure_png

# family -> (marker, colour): DenseNets in blues and greens with filled round-ish markers, ResNets in reds with
# triangles, so the two groups separate at a glance and the variants within each still differ.
STYLES: dict[str, tuple[str, str]] = {
    "DenseNet-BC": ("o", "#1f77b4"),
    "DenseNet-B": ("s", "#17becf"),
    "DenseNet-C": ("D", "#2ca02c"),
    "DenseNet": ("p", "#9467bd"),
    "ResNet": ("^", "#d62728"),
    "pre-act ResNet": ("v", "#ff7f0e"),
}
RESNET_FAMILIES = ("ResNet", "pre-act ResNet")
# Options that may differ between the runs of one comparison (what is compared, and where each run wrote).
PER_RUN = ("model", "out", "info", "runtime", "data_dir", "device", "workers", "threads", "quiet")
# The files write_figure4 writes into its folder.
OUTPUTS = ("figure4.png", "curves.png", "figure4.md")
# Training images per epoch where neither --train-subset nor the run's train.log says.
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000}


@dataclass
class Figure4Run:
    """One run folder's point: the network, its size and cost, and what the training gave."""

    run: str
    model: str
    family: str
    label: str
    params: int
    macs: int
    epochs_done: int
    epochs_planned: int
    minutes: float
    images_per_second: float | None
    test_error: float
    config: dict[str, Any] = field(repr=False)
    history: list[dict[str, float | None]] = field(repr=False)
    # From train.log's "machine:" lines (scripts/figure4.sh): the CPU, and each fp32 matmul peak in GFLOP/s with
    # when it was taken ("before the run", "after the run"; a resumed run has a pair per part).
    cpu: str | None = None
    peaks: list[tuple[int, str]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.epochs_planned


def family(config: dict[str, Any]) -> str:
    """The paper's name for a network's variant, from its constructor arguments (models/registry.py)."""
    if config.get("arch") == "preresnet":
        return "pre-act ResNet"
    if config.get("arch") == "resnet":
        return "ResNet"
    bottleneck = bool(config.get("bottleneck_width"))
    compressed = float(config.get("compression", 1.0)) < 1.0
    return {(True, True): "DenseNet-BC", (True, False): "DenseNet-B", (False, True): "DenseNet-C"}.get(
        (bottleneck, compressed), "DenseNet")


def label(name: str, config: dict[str, Any]) -> str:
    """A short point label: "BC L=40 k=12", "ResNet-56", "pre-act ResNet-164"; the name for anything else."""
    if config.get("arch") in ("resnet", "preresnet"):
        return f"{family(config)}-{config['depth']}"
    match = re.match(r"^densenet(?:_(bc|b|c))?(\d+)_k(\d+)$", name)
    if not match:
        return name
    kind = f"{match[1].upper()} " if match[1] else ""
    return f"{kind}L={match[2]} k={match[3]}"


@functools.cache
def network_cost(name: str, num_classes: int, in_chans: int, input_size: int) -> tuple[int, int]:
    """(parameters, forward multiply-accumulates of one image) of a registry network, counted on a meta copy."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from densenet.models.registry import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, in_chans, input_size, input_size))
    return params, counter.get_total_flops() // 2


def _train_images(run_dir: Path, config: dict[str, Any]) -> int | None:
    """Images per training epoch: --train-subset, else the count train.log's first line gives, else the set's."""
    if config.get("train_subset"):
        return int(config["train_subset"])
    try:
        with open(run_dir / "train.log", encoding="utf-8", errors="replace") as f:
            for line in f:
                match = re.match(r"^training \S+ on \S+ \((\d+) images", line)
                if match:
                    return int(match[1])
    except OSError:
        pass
    return TRAIN_IMAGES.get(str(config.get("dataset")))


MACHINE_LINE = re.compile(r"^machine: (.+), fp32 matmul peak (\d+) GFLOP/s \((?:\d+ threads, )?([^)]*)\)\s*$")


def _machine(run_dir: Path) -> tuple[str | None, list[tuple[int, str]]]:
    """The CPU and the fp32 matmul peaks (GFLOP/s, when) that train.log's "machine:" lines give, in order."""
    cpus, peaks = [], []
    try:
        with open(run_dir / "train.log", encoding="utf-8", errors="replace") as f:
            for line in f:
                match = MACHINE_LINE.match(line)
                if match:
                    cpus.append(match[1])
                    peaks.append((int(match[2]), match[3]))
    except OSError:
        pass
    return (" / ".join(dict.fromkeys(cpus)) or None), peaks


def _number(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def read_run(run_dir: str | Path) -> Figure4Run:
    """One run folder as a Figure 4 point; a DenseNetError says what is missing or malformed."""
    from densenet.models.registry import model_config

    run_dir = Path(run_dir)
    for name in ("config.yaml", "metrics.csv"):
        if not (run_dir / name).is_file():
            raise DenseNetError(f"{run_dir} is not a run folder with results: it has no {name}")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise DenseNetError(f"{run_dir / 'config.yaml'} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(config, dict) or not config.get("model") or not config.get("dataset"):
        raise DenseNetError(f"{run_dir / 'config.yaml'} names no model and data set (is it a run's config.yaml?)")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        history = [{"epoch": int(row["epoch"]), "train_loss": float(row["train_loss"]),
                    "train_error": float(row["train_error"]), "test_error": _number(row.get("test_error")),
                    "seconds": float(row["seconds"])} for row in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise DenseNetError(f"{run_dir / 'metrics.csv'} has a malformed row: {exc}") from exc
    tested = [row for row in history if row["test_error"] is not None]
    if not tested:
        raise DenseNetError(f"{run_dir / 'metrics.csv'} has no epoch with a test error yet")
    name, dataset = str(config["model"]), str(config["dataset"])
    record = DATASETS.get(dataset)
    architecture = model_config(name)
    num_classes = record.num_classes if record and record.num_classes else architecture.get("num_classes", 10)
    in_chans = record.in_chans if record else architecture.get("in_chans", 3)
    input_size = int(config.get("input_size") or (record.input_size if record else 32))
    params, macs = network_cost(name, int(num_classes), int(in_chans), input_size)
    seconds = sum(row["seconds"] for row in history)
    images = _train_images(run_dir, config)
    rate = images * len(history) / seconds if images and seconds > 0 else None
    cpu, peaks = _machine(run_dir)
    return Figure4Run(run_dir.name, name, family(architecture), label(name, architecture), params, macs,
                      len(history), int(config.get("epochs") or len(history)), seconds / 60, rate,
                      float(tested[-1]["test_error"]), config, history, cpu, peaks)


def protocol_differences(runs: list[Figure4Run]) -> dict[str, list[Any]]:
    """Recipe options (beyond the model and where it ran) whose values differ between the runs: empty when the
    comparison is under one protocol, as the figure claims."""
    keys = sorted({k for r in runs for k in r.config} - set(PER_RUN))
    differ = {}
    for key in keys:
        values = [r.config.get(key) for r in runs]
        if any(v != values[0] for v in values[1:]):
            differ[key] = values
    # --amp auto resolves per machine (bf16 where the CPU computes it natively): what ran is in runtime
    precisions = [(r.config.get("runtime") or {}).get("amp") for r in runs]
    if any(p != precisions[0] for p in precisions[1:]):
        differ["precision (runtime.amp)"] = precisions
    return differ


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def markdown(runs: list[Figure4Run], command: str = "") -> str:
    """The table of the figure's points, the protocol check, and the command."""
    lines = [f"Made by `{command}`.", ""] if command else []
    lines += ["| network | family | params | MACs | img/s | minutes | epochs | test error (%) | matmul GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r.family in RESNET_FAMILIES, r.params)):
        epochs = f"{r.epochs_done}" + ("" if r.finished else f" of {r.epochs_planned} (unfinished)")
        rate = "–" if r.images_per_second is None else f"{r.images_per_second:.0f}"
        where = "" if r.run == r.model else f" ({r.run})"  # the folder, where it is not named after the network
        peaks = " / ".join(str(gflops) for gflops, _ in r.peaks) or "–"
        lines.append(f"| {r.model}{where} | {r.family} | {_millions(r.params)} | {r.macs / 1e6:.1f}M | {rate} "
                     f"| {r.minutes:.1f} | {epochs} | {r.test_error:.2f} | {peaks} |")
    lines += ["", "Test error: the last evaluated epoch's. MACs: one forward pass of one image (convolutions and "
              "linear layers). img/s: training images per wall-clock second over the whole run (evaluation and "
              "compiling included); minutes: the sum of metrics.csv's seconds. matmul GFLOP/s: the fp32 peak of one "
              "(2048 x 2048) product, measured just before and just after the run (before / after; a resumed run "
              "adds a pair), a yardstick of a quiet machine: one far below the others says something else ran."]
    cpus = {r.run: r.cpu or "not recorded" for r in runs}
    if len(set(cpus.values())) == 1:
        lines += ["", f"CPU: {next(iter(cpus.values()))} (every run)."]
    else:
        lines += ["", "**Not one machine**: " + "; ".join(f"{run}: {cpu}" for run, cpu in cpus.items()) + "."]
    differ = protocol_differences(runs)
    if differ:
        lines += ["", "**Not one protocol**: the runs' recipes differ in " + "; ".join(
            f"{k} ({', '.join(f'{r.run}: {v}' for r, v in zip(runs, values, strict=True))})"
            for k, values in differ.items()) + "."]
    else:
        lines += ["", "Protocol: every run has the same recipe (config.yaml equal but for the model and where it "
                  "ran)."]
    pair = curve_pair(runs)
    if pair:
        lines += ["", f"Curves: {pair[0].label} ({pair[0].test_error:.2f}%, {_millions(pair[0].params)}) beside "
                  f"{pair[1].label} ({pair[1].test_error:.2f}%, {_millions(pair[1].params)})."]
    return "\n".join(lines) + "\n"


def curve_pair(runs: list[Figure4Run]) -> tuple[Figure4Run, Figure4Run] | None:
    """The best DenseNet-BC and the ResNet (either form) whose test error is closest to it; None without both."""
    bc = [r for r in runs if r.family == "DenseNet-BC"]
    resnets = [r for r in runs if r.family in RESNET_FAMILIES]
    if not bc or not resnets:
        return None
    best = min(bc, key=lambda r: r.test_error)
    return best, min(resnets, key=lambda r: (abs(r.test_error - best.test_error), r.params))


def _png(fig) -> bytes:
    return figure_png(fig, dpi=110)


def plot_points(runs: list[Figure4Run]) -> bytes:
    """Test error against parameters, forward MACs and wall-clock minutes (log axes), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    panels = (("params", "parameters", "error against parameters"),
              ("macs", "forward multiply-accumulates per image", "error against computation"),
              ("minutes", "wall-clock minutes on this machine (training + evaluation)", "error against time"))
    for ax, (attribute, xlabel, title) in zip(axes, panels, strict=True):
        for name, (marker, colour) in STYLES.items():
            members = sorted((r for r in runs if r.family == name), key=lambda r: getattr(r, attribute))
            if not members:
                continue
            xs = [getattr(r, attribute) for r in members]
            # one line per family (the paper joins a family's sizes); hollow markers for unfinished runs
            ax.plot(xs, [r.test_error for r in members], linestyle="-" if name in RESNET_FAMILIES else "--",
                    color=colour, alpha=0.5)
            for r, x in zip(members, xs, strict=True):
                ax.plot(x, r.test_error, marker, color=colour, ms=9, mfc=colour if r.finished else "none")
                ax.annotate(r.label, (x, r.test_error), fontsize=7, xytext=(5, 3), textcoords="offset points")
            ax.plot([], [], marker, color=colour, label=name)  # the legend's entry: marker only
        if attribute != "minutes":  # sizes span decades; minutes are read as minutes
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
            ax.xaxis.set_minor_formatter(ticker.FuncFormatter(
                lambda v, _: f"{v / 1e6:g}M" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test error (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_curves(pair: tuple[Figure4Run, Figure4Run]) -> bytes:
    """Training and test curves of the pair (test error, training error and training loss against the epoch,
    test error against minutes), as PNG bytes."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_error, ax_loss, ax_time) = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in pair:
        marker, colour = STYLES[r.family]
        name = f"{r.label} ({_millions(r.params)})"
        epochs = [row["epoch"] for row in r.history]
        minutes = [s / 60 for s in itertools.accumulate(row["seconds"] for row in r.history)]
        tested = [(row["epoch"], m, row["test_error"]) for row, m in zip(r.history, minutes, strict=True)
                  if row["test_error"] is not None]
        ax_error.plot([t[0] for t in tested], [t[2] for t in tested], marker=marker, ms=4, color=colour,
                      label=f"{name}: test error")
        ax_error.plot(epochs, [row["train_error"] for row in r.history], "--", color=colour, alpha=0.6,
                      label=f"{name}: training error")
        ax_loss.plot(epochs, [row["train_loss"] for row in r.history], color=colour, label=name)
        ax_time.plot([t[1] for t in tested], [t[2] for t in tested], marker=marker, ms=4, color=colour, label=name)
    for ax, xlabel, ylabel, title in ((ax_error, "epoch", "error (%)", "test and training error"),
                                      (ax_loss, "epoch", "training loss", "training loss"),
                                      (ax_time, "wall-clock minutes", "test error (%)", "test error against time")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def write_figure4(runs: list[Figure4Run], out_dir: str | Path, command: str = "") -> list[Path]:
    """figure4.png, curves.png (when there is a DenseNet-BC and a ResNet) and figure4.md in ``out_dir``."""
    from densenet.files import atomic_write

    if not runs:
        raise DenseNetError("no run folders to draw")
    out_dir = Path(out_dir)
    pair = curve_pair(runs)
    files = {"figure4.png": plot_points(runs)}
    if pair:
        files["curves.png"] = plot_curves(pair)
    images = "\n".join(f"![{name[:-4]}]({name})" for name in files)
    files["figure4.md"] = (markdown(runs, command) + "\n" + images + "\n").encode()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            atomic_write(out_dir / name, lambda f, blob=blob: f.write(blob))
    except OSError as exc:
        raise DenseNetError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return [out_dir / name for name in files]
