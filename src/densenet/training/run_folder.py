"""The run folder: config.yaml, metrics.csv, TensorBoard events, curves.png, checkpoints, model.safetensors.

Only rank 0 writes here. Every file is replaced atomically (a temporary file, then a rename), so an
interrupted run leaves complete files a ``--resume`` can trust; metrics.csv is rewritten from the
history stored in the checkpoint, so after a resume it holds exactly one row per finished epoch.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from densenet.errors import ConfigError
from densenet.files import atomic_write, pid_alive, with_advice
from densenet.training.checkpoint import BEST, LAST

WEIGHTS = "model.safetensors"
OWNER = ".owner"  # "HOST PID" of the process that started the run in this folder
COLUMNS = ["epoch", "lr", "train_loss", "train_error", "test_error", "test_top5_error", "seconds"]


def new_run_dir(out: str | None, dataset: str, model: str) -> Path:
    """The folder a new run writes to: ``--out`` (empty, new, or a run that never checkpointed), else
    runs/<dataset>-<model>-<time>."""
    if out:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file, not a folder")
        if _never_checkpointed(path):
            print(f"--out {path} holds a run that stopped before its first checkpoint (nothing to resume): "
                  f"starting a new run there", flush=True)
            return path
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


def _never_checkpointed(path: Path) -> bool:
    """A run folder whose run was killed before its first checkpoint: config.yaml, but no checkpoint, no weights,
    and no live process still writing it (the owner file names the writer's host and PID)."""
    if not (path / "config.yaml").is_file():
        return False
    if any((path / name).exists() for name in (LAST, BEST, WEIGHTS, "metrics.csv")):
        return False
    try:
        host, pid = (path / OWNER).read_text().split()
    except (OSError, ValueError):
        return False  # written before owner files existed, or unreadable: do not guess
    if host == socket.gethostname() and int(pid) != os.getpid() and pid_alive(int(pid)):
        raise ConfigError(f"--out {path} is in use by a run still going (process {pid}); choose another --out")
    return host == socket.gethostname()


def finish_from_checkpoint(run_dir: Path, checkpoint: dict[str, Any], title: str,
                           paper_error: float | None = None) -> dict[str, Any]:
    """Write model.safetensors (and curves.png) of a run whose last epoch was checkpointed but whose final
    weights were never written (a process or torchrun worker killed in between). As ``train``'s end: the
    last epoch's weights, or on a data set with a validation split those of the lowest validation error."""
    from densenet.models.densenet import DenseNet
    from densenet.models.weights import load_into, save_weights
    from densenet.training.checkpoint import load_checkpoint

    history, best = list(checkpoint["history"]), dict(checkpoint["best"])
    reported, state, source = history[-1], checkpoint["model"], run_dir / LAST
    if best.get("metric") == "val_error" and best["epoch"] != reported["epoch"]:
        reported, source = history[best["epoch"] - 1], run_dir / BEST
        state = load_checkpoint(source)["model"]
    if os.environ.get("RANK", "0") == "0":
        model = DenseNet(**checkpoint["model_config"])
        load_into(model, state, source=str(source))
        save_weights(model, run_dir / WEIGHTS, dict(checkpoint["metadata"]))
        write_metrics(run_dir, history)  # its last row may be missing too: it is written after the checkpoint
        write_curves(run_dir, history, title)
        epochs = f"{checkpoint['epoch']} epoch{'s' if checkpoint['epoch'] != 1 else ''}"
        print(f"the run in {run_dir} had finished its {epochs} but not written its final "
              f"weights: wrote {run_dir / WEIGHTS} (epoch {reported['epoch']}, test error "
              f"{reported['test_error']:.2f}%)", flush=True)
    return {"run_dir": str(run_dir), "epoch": reported["epoch"], "test_error": reported["test_error"],
            "test_top5_error": reported["test_top5_error"], "paper_error": paper_error}


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder; a refusal (permissions, a full disk) names the folder and says what to do."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise with_advice(exc, run_dir) from exc


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_config(run_dir: Path, options: dict[str, Any]) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(options, sort_keys=False))
    # Who writes this run (see _never_checkpointed): advisory, so a plain write, no fsync; torn, it is ignored.
    try:
        (run_dir / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as exc:
        raise with_advice(exc, run_dir / OWNER) from exc


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
    """Train and test error against epoch, as the paper's Figure 4 (right), and both against the wall-clock
    minutes of training plus evaluation (the running sum of metrics.csv's seconds). The train error is drawn
    against time too because a short run evaluates only every few epochs (--eval-every): two test points alone
    would say little about how the minutes were spent."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    minutes = [s / 60 for s in itertools.accumulate(row.get("seconds", 0.0) for row in history)]
    # Epochs without an evaluation (--eval-every) have no test or validation error: plot the evaluated ones.
    tested = [(e, m, row["test_error"]) for e, m, row in zip(epochs, minutes, history, strict=True)
              if "test_error" in row]
    sparse = len(tested) < len(epochs)  # evaluated every few epochs: mark the points
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax.plot(epochs, [row["train_error"] for row in history], label="train error")
    if any("val_error" in row for row in history):
        ax.plot(*zip(*[(row["epoch"], row["val_error"]) for row in history if "val_error" in row], strict=True),
                marker=".", label="validation error")
    if tested:
        ax.plot([t[0] for t in tested], [t[2] for t in tested], marker="." if sparse else None,
                label="test error")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    ax_time.plot(minutes, [row["train_error"] for row in history], color="C0", alpha=0.6, label="train error")
    if tested:
        ax_time.plot([t[1] for t in tested], [t[2] for t in tested], marker="o" if sparse else None, color="C1",
                     label="test error")
        _, m, error = tested[-1]
        ax_time.annotate(f"{error:.2f}% after {m:.1f} min", (m, error), textcoords="offset points",
                         xytext=(-10, 12), ha="right")
    ax_time.set_xlabel("wall-clock minutes (training + evaluation)")
    ax_time.set_ylabel("error (%)")
    ax_time.set_title("error against time")
    ax_time.grid(alpha=0.3)
    ax_time.legend()
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
