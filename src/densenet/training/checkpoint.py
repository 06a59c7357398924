"""Training checkpoints: written atomically, read without running code.

A checkpoint is a dict of tensors and plain values (model, optimizer, scheduler, epoch, config, RNG
states...). ``save_checkpoint`` writes it with ``densenet.files.atomic_write`` (temporary file, fsync,
rename), so a crash at any moment leaves either the old or the new checkpoint, never a torn one.
``load_checkpoint`` reads it with ``densenet.files.safe_load`` (weights-only unpickling): a checkpoint
from a stranger cannot run code, it is refused with a message.

A run folder holds two: checkpoint_last.pt (every epoch; what --resume continues) and checkpoint_best.pt
(see ``BEST``: on data without a validation split it is chosen on the test set, so it is not a result).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from densenet.errors import DenseNetError
from densenet.files import atomic_write, safe_load

LAST = "checkpoint_last.pt"
# The epoch with the lowest validation error; on a data set without a validation split (CIFAR, ImageNet,
# folders) the lowest *test* error, a choice made on the test set: kept for inspection, never reported.
# The paper reports the last epoch (model.safetensors); SVHN, with a validation split, is the exception.
BEST = "checkpoint_best.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, flush, fsync, rename)."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as exc:
        raise DenseNetError(f"could not write checkpoint {path}: {exc.strerror or exc}") from exc


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
