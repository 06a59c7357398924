"""Files written atomically and read without running code: what every layer that saves or loads shares.

``atomic_write`` writes a temporary file in the same folder, flushes and fsyncs it, then renames it over
the old one, so a crash at any moment leaves either the old or the new file, never a torn one.
``safe_load`` unpickles with ``weights_only=True``: a file from a stranger cannot run code, it is refused
with a message. Training checkpoints, weight files, reports and caches all go through these two.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from densenet.errors import DenseNetError

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


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load`` with weights-only unpickling: tensors and plain values, never code; DenseNetError otherwise."""
    import torch

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
