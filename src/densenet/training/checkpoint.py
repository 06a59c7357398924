"""Training checkpoints: written atomically, read without running code.

A checkpoint is a dict of tensors and plain values (model, optimizer, scheduler, epoch, config, RNG
states...). ``save_checkpoint`` writes a temporary file in the same folder, flushes and fsyncs it, then
renames it over the old one, so a crash at any moment leaves either the old or the new checkpoint,
never a torn one. ``load_checkpoint`` unpickles with ``weights_only=True``: a checkpoint from a stranger
cannot run code, it is refused with a message.
"""

from __future__ import annotations

import errno
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


_ADVICE = {errno.ENOSPC: "free space on that disk, or write elsewhere (another --out)",
           errno.EDQUOT: "free space within your disk quota, or write elsewhere (another --out)",
           errno.EACCES: "make the folder writable for this user, or write elsewhere (another --out)",
           errno.EPERM: "make the folder writable for this user, or write elsewhere (another --out)",
           errno.EROFS: "the file system is read-only: write elsewhere (another --out)"}


def with_advice(exc: OSError, path: str | os.PathLike, tmp: Path | None = None) -> OSError:
    """The same error (OSError picks the subclass from errno), naming the file the user asked for (not our
    temporary) and saying what to do (free space, another --out) where that is known."""
    strerror = exc.strerror or str(exc)
    if exc.errno in _ADVICE and _ADVICE[exc.errno] not in strerror:
        strerror = f"{strerror} ({_ADVICE[exc.errno]})"
    filename = exc.filename if exc.filename not in (None, str(tmp)) else str(path)
    return OSError(exc.errno, strerror, filename)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-PID-*`` files that writers killed mid-write left in ``folder``; the paths removed.

    A file is stale when its PID is no live process on this machine (ours is never touched); a live PID,
    even one reused by another program, keeps its file: only a sure leftover is deleted.
    """
    removed = []
    try:
        candidates = list(Path(folder).glob(f"{_TMP_PREFIX}*-*"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # read-only or already gone: the write that follows says what is wrong, if anything
    return removed


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it into place once it is on disk.

    Temporaries that killed writers left in the folder are deleted first (``sweep_temporaries``). An OSError
    names the file and, for a full disk or a refused write, says what to do.
    """
    path = Path(path)
    sweep_temporaries(path.parent)
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_advice(exc, path, tmp) from exc
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
