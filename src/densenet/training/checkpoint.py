"""Training checkpoints: written atomically, read without running code.

A checkpoint is a dict of tensors and plain values (model, optimizer, scheduler, epoch, config, RNG
states...). ``save_checkpoint`` writes a temporary file in the same folder, flushes and fsyncs it, then
renames it over the old one, so a crash at any moment leaves either the old or the new checkpoint,
never a torn one. ``load_checkpoint`` unpickles with ``weights_only=True``: a checkpoint from a stranger
cannot run code, it is refused with a message.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from densenet.errors import DenseNetError

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
_TMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it into place once it is on disk."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a full disk fails in write or fsync, which do not say which file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, flush, fsync, rename)."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as exc:
        raise DenseNetError(f"could not write checkpoint {path}: {exc.strerror or exc}") from exc


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load`` with weights-only unpickling: tensors and plain values, never code; DenseNetError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DenseNetError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DenseNetError(f"refusing to load {path}: it holds objects other than tensors and plain values, "
                            f"and loading it could run code (weights-only unpickling rejected it)") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DenseNetError(f"{path} is not a readable {what} (truncated or corrupt?): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights-only unpickling; a clear DenseNetError if it is missing, torn or unsafe."""
    state = safe_load(path, map_location)
    if not isinstance(state, dict):
        raise DenseNetError(f"{path} is not a densenet checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a resume should use: the readable one of last/best with the highest epoch.

    Atomic writes mean checkpoint_last.pt is whole; if it was damaged anyway (a disk error, a copy cut
    short), the best checkpoint is an earlier but consistent state to continue from.
    """
    run_dir = Path(run_dir)
    found: list[tuple[int, Path]] = []
    for name in (LAST, BEST):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except DenseNetError:
            continue
        found.append((int(state.get("epoch", -1)), path))
    if not found:
        return None
    return max(found, key=lambda item: (item[0], item[1].name == LAST))[1]
