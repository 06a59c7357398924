"""The run folder: config.yaml, metrics.csv, TensorBoard events, curves.png, checkpoints, model.safetensors.

Only rank 0 writes here. Every file is replaced atomically (a temporary file, then a rename), so an
interrupted run leaves complete files a ``--resume`` can trust; metrics.csv is rewritten from the
history stored in the checkpoint, so after a resume it holds exactly one row per finished epoch.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import yaml

from densenet.errors import ConfigError
from densenet.training.checkpoint import LAST, atomic_write

COLUMNS = ["epoch", "lr", "train_loss", "train_error", "test_error", "test_top5_error", "seconds"]


def new_run_dir(out: str | None, dataset: str, model: str) -> Path:
    """The folder a new run writes to: ``--out`` (empty or new), else runs/<dataset>-<model>-<time>."""
    if out:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file, not a folder")
        if (path / LAST).exists() or (path / "config.yaml").exists():
            raise ConfigError(f"--out {path} already holds a run; continue it with --resume {path} "
                              f"or choose another --out")
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{dataset}-{model}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / f"{dataset}-{model}-{stamp}-{suffix}"
    return path


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_config(run_dir: Path, options: dict[str, Any]) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(options, sort_keys=False))


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    columns = list(COLUMNS)
    if any("val_error" in row for row in history):
        columns.insert(4, "val_error")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(run_dir / "metrics.csv", buffer.getvalue())


def write_curves(run_dir: Path, history: list[dict[str, float]], title: str) -> None:
    """Train and test error against epoch, as the paper's Figure 4 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [row["train_error"] for row in history], label="train error")
    if any("val_error" in row for row in history):
        ax.plot(epochs, [row.get("val_error", float("nan")) for row in history], label="validation error")
    ax.plot(epochs, [row["test_error"] for row in history], label="test error")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(run_dir / "curves.png", lambda f: f.write(buffer.getvalue()))


class TensorBoard:
    """Scalars per epoch under the run folder; silently absent when tensorboard is not installed."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # an optional convenience, not a reason to stop a run
            self.writer = None
        else:
            self.writer = SummaryWriter(str(run_dir))

    def log(self, row: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
