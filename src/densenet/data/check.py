"""``densenet check-data FOLDER...``: find every broken image file before a long run meets one mid-epoch.

    densenet check-data /imagenet/train /imagenet/val        # or a folder-data-set root: data/mine
    densenet check-data data/cifar10 --workers 2 --quiet

Each image file under the folders (by extension, as the data sets list them; a file named on the command line
is checked whatever its name) is decoded in full by ``load_image``, exactly as training and predict read it, so
a file this passes will not stop a run. Broken files are printed one a line (``cannot read image FILE:
REASON``) as they are found, a progress bar runs on stderr, and a summary line ends the check. Exit status:
0 when every file reads, 1 when some are broken, 2 for bad arguments (a folder that does not exist).

The files found readable are remembered per folder (by path, size and modification time) in a small cache
beside it (``.densenet-checked-NAME.npy``, or under ~/.cache/densenet when that place is read-only), so a
second check decodes only new and changed files: after fixing three broken files in ImageNet, the recheck
takes the time of listing the folder. ``--no-cache`` decodes everything again (a file damaged in place
without a change of size or time, e.g. by a failing disk, is only found that way).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from densenet.data.images import IMAGE_EXTENSIONS, load_image
from densenet.errors import DenseNetError
from densenet.files import printable


def image_files(folder: Path) -> list[Path]:
    """The image files (by extension, as the data sets list them) anywhere under ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class CheckedCache:
    """The files under one folder that were found readable, as 64-bit keys of (relative path, size, mtime)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        resolved = folder.resolve()
        name = f".densenet-checked-{resolved.name or 'root'}.npy"
        if os.access(resolved.parent, os.W_OK):
            self.path = resolved.parent / name
        else:
            tag = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:12]
            self.path = Path.home() / ".cache" / "densenet" / f"{tag}{name}"

    def key(self, path: Path) -> int:
        """Of a file under the folder: its path relative to the folder, its size and its modification time."""
        st = path.stat()
        # The name as bytes: a file name that is not UTF-8 (made on another system) is a key like any other.
        text = os.fsencode(path.relative_to(self.folder)) + f"\0{st.st_size}\0{st.st_mtime_ns}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    def load(self) -> np.ndarray:
        try:
            return np.load(self.path, allow_pickle=False).astype(np.uint64)
        except (OSError, ValueError):
            return np.empty(0, dtype=np.uint64)  # none yet, or damaged: everything is checked

    def save(self, keys: np.ndarray) -> None:
        """Best effort: a cache that cannot be written only costs the decoding next time."""
        from densenet.files import atomic_write

        buffer = io.BytesIO()
        np.save(buffer, np.unique(keys.astype(np.uint64)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda f: f.write(buffer.getvalue()))
        except OSError:
            pass


def _check_one(path: Path) -> str | None:
    """None when ``path`` decodes as training would decode it, else the reason on one line."""
    try:
        load_image(path).close()
    except DenseNetError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - anything Pillow raises is a broken file for the data set
        reason = f"cannot read image {printable(path)}: {type(exc).__name__}: {exc}"
    else:
        return None
    return " ".join(line.strip() for line in reason.splitlines())  # one line per file, whatever the decoder said


def check_images(files: Sequence[Path], workers: int = 1,
                 on_result: Callable[[Path, str | None], None] | None = None) -> list[str]:
    """Decode every file (in ``workers`` processes); the one-line reasons of the broken ones, in file order."""
    broken: list[str] = []
    results: Iterable[str | None]
    pool = None
    if workers > 1 and len(files) > 1:
        pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
        results = pool.imap(_check_one, files, chunksize=max(1, min(256, len(files) // (workers * 8) or 1)))
    else:
        results = map(_check_one, files)
    try:
        for path, reason in zip(files, results, strict=True):
            if reason is not None:
                broken.append(reason)
            if on_result is not None:
                on_result(path, reason)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return broken
