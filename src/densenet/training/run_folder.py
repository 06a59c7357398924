"""The run folder: config.yaml, metrics.csv, TensorBoard events, curves.png, checkpoints, model.safetensors.

Only rank 0 writes here, and one process at a time: ``RunLock`` holds an exclusive OS lock on RUN/.lock for the
whole run, taken before anything is written in the folder, so a second ``train --out RUN`` or ``--resume RUN`` stops
at once naming the process that writes it; the kernel releases the lock when that process ends, even by SIGKILL, so
a killed run never blocks its own resume. Every file is replaced atomically (a temporary file, then a rename), so an
interrupted run leaves complete files a ``--resume`` can trust; metrics.csv is rewritten from the history stored in
the checkpoint, so after a resume it holds exactly one row per finished epoch.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import time
from pathlib import Path
from typing import Any

import yaml

from densenet.errors import ConfigError
from densenet.files import atomic_write, figure_png, printable, with_advice
from densenet.training.checkpoint import BEST, LAST

WEIGHTS = "model.safetensors"
LOCK = ".lock"  # flock()ed by the process writing the run; holds its PID
COLUMNS = ["epoch", "lr", "train_loss", "train_error", "test_error", "test_top5_error", "seconds"]


class RunLock:
    """The exclusive lock on a run folder (``fcntl.flock`` on RUN/.lock), held until ``release`` or the process ends.

    flock belongs to the open file, not the process: a second lock on the same folder fails even from the same
    process (a test, a notebook), and the kernel drops it when the process dies however it dies. The PID written
    into the file after locking is what a refused second writer names.
    """

    def __init__(self, run_dir: Path, flag: str = "--out") -> None:
        self.path = Path(run_dir) / LOCK
        try:
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise with_advice(exc, self.path) from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self.fd)
            self.release()
            raise ConfigError(in_use(run_dir, flag, holder)) from None
        os.ftruncate(self.fd, 0)  # written after locking: the holder's PID, never a loser's
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The PID the lock's holder wrote (it writes just after locking: a moment's wait covers that gap)."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


def in_use(run_dir: Path, flag: str, holder: str) -> str:
    advice = ("choose another --out" if flag == "--out"
              else "wait for it to end (or stop it), or --fork NEW_DIR to continue a copy elsewhere")
    return f"{flag} {printable(run_dir)} is in use by a run still going (process {holder}); {advice}"


def lock_held(run_dir: Path) -> str | None:
    """The PID of the process holding ``run_dir``'s lock, or None when no process does (nothing is created)."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def new_run_dir(out: str | None, dataset: str, model: str) -> Path:
    """The folder a new run writes to: ``--out`` (empty, new, or a run that never checkpointed), else
    runs/<dataset>-<model>-<time>. Checked again once the folder is locked (``check_out``)."""
    if out:
        path = Path(out)
        check_out(path, locked=False)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{dataset}-{model}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / f"{dataset}-{model}-{stamp}-{suffix}"
    return path


def check_out(path: Path, locked: bool) -> None:
    """``--out`` may take a new run: it is new or empty, or holds a run killed before its first checkpoint.

    ``locked``: this process holds the folder's lock, so no other writes it; otherwise a live holder is named.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {printable(path)} is a file, not a folder")
    holder = None if locked else lock_held(path)
    if holder is not None:
        raise ConfigError(in_use(path, "--out", holder))
    if _never_checkpointed(path):
        if not locked:
            print(f"--out {path} holds a run that stopped before its first checkpoint (nothing to resume): "
                  f"starting a new run there", flush=True)
        return
    if (path / LAST).exists() or (path / "config.yaml").exists():
        raise ConfigError(f"--out {printable(path)} already holds a run; continue it with --resume {printable(path)} "
                          f"or choose another --out")


def _never_checkpointed(path: Path) -> bool:
    """A run folder whose run was killed before its first checkpoint: config.yaml, but no checkpoint, no weights,
    no metrics (the caller has made sure no live process holds its lock)."""
    if not (path / "config.yaml").is_file():
        return False
    return not any((path / name).exists() for name in (LAST, BEST, WEIGHTS, "metrics.csv"))


def finish_from_checkpoint(run_dir: Path, checkpoint: dict[str, Any], title: str,
                           paper_error: float | None = None) -> dict[str, Any]:
    """Write model.safetensors (and curves.png) of a run whose last epoch was checkpointed but whose final
    weights were never written (a process or torchrun worker killed in between). As ``train``'s end: the
    last epoch's weights, or on a data set with a validation split those of the lowest validation error."""
    from densenet.models import resnet
    from densenet.models.densenet import DenseNet
    from densenet.models.weights import load_into, save_weights
    from densenet.training.checkpoint import load_checkpoint

    history, best = list(checkpoint["history"]), dict(checkpoint["best"])
    reported, state, source = history[-1], checkpoint["model"], run_dir / LAST
    if best.get("metric") == "val_error" and best["epoch"] != reported["epoch"]:
        reported, source = history[best["epoch"] - 1], run_dir / BEST
        state = load_checkpoint(source)["model"]
    if os.environ.get("RANK", "0") == "0":
        config = checkpoint["model_config"]  # a DenseNet's, or a comparison ResNet's (models/resnet.py)
        model = resnet.build_resnet(config) if resnet.is_resnet_config(config) else DenseNet(**config)
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


def edited_config(run_dir: Path, saved: dict[str, Any]) -> list[str]:
    """The options whose value in RUN/config.yaml differs from ``saved`` (the checkpoint's), as "name: value";
    [] when the file is missing or unreadable (then there is no edit to report)."""
    try:
        written = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(written, dict):
        return []
    written.pop("runtime", None)  # how the run ran (training/fast.py), not an option
    written.pop("task", None)  # what the data were (training/tasks.py), not an option
    return [f"{key}: {written.get(key)!r}" for key in sorted(set(written) | set(saved))
            if key != "info" and written.get(key) != saved.get(key)]


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch. A multiclass run has COLUMNS (and val_error); a binary or multilabel run's measures
    (val_auroc, val_acc, ..., training/tasks.py) follow in the order its rows give them, and the error columns
    it has no values for are left out."""
    columns = list(COLUMNS)
    if any("val_error" in row for row in history):
        columns.insert(4, "val_error")
    extra = list(dict.fromkeys(k for row in history for k in row if k not in columns))
    if extra:
        columns = [c for c in columns if any(c in row for row in history)] + extra
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
    if any("val_auroc" in row or "test_auroc" in row for row in history):  # binary, multilabel: AUROC too
        from densenet.training.tasks import write_task_curves

        return write_task_curves(run_dir, history, title)
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
    png = figure_png(fig)
    atomic_write(run_dir / "curves.png", lambda f: f.write(png))


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
