"""``densenet check-data FOLDER...``: find every broken image file before a long run meets one mid-epoch.

    densenet check-data /imagenet/train /imagenet/val        # or a folder-data-set root: data/mine
    densenet check-data data/cifar10 --workers 2 --quiet

Each image file under the folders (by extension, as the data sets list them; a file named on the command line
is checked whatever its name) is decoded in full by ``load_image``, exactly as training and predict read it, so
a file this passes will not stop a run. Broken files are printed one a line (``cannot read image FILE:
REASON``) as they are found, a progress bar runs on stderr, and a summary line ends the check. Exit status:
0 when every file reads, 1 when some are broken, 2 for bad arguments (a folder that does not exist).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from densenet.data.images import IMAGE_EXTENSIONS, load_image
from densenet.errors import DenseNetError


def image_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named, and the image files (by extension) anywhere under the folders named, sorted per folder."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif item.exists():
            found.append(item)
        else:
            raise DenseNetError(f"{item}: no such file or folder")
    return found


def _check_one(path: Path) -> str | None:
    try:
        load_image(path).close()
    except DenseNetError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - anything Pillow raises is a broken file for the data set
        return f"cannot read image {path}: {type(exc).__name__}: {exc}"
    return None


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FOLDER_OR_FILE",
                        help="data folders (e.g. data/mine, /imagenet/train) searched recursively, or image files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes decoding in parallel (default: one per CPU core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.workers < 1:
        raise DenseNetError(f"--workers must be at least 1, got {args.workers}")
    files = image_files(args.paths)
    if not files:
        raise DenseNetError(f"no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) under {', '.join(args.paths)}")
    start = time.perf_counter()
    with tqdm(total=len(files), unit="img", desc="checking", disable=args.quiet, file=sys.stderr,
              mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True) as bar:

        def report(path: Path, reason: str | None) -> None:
            if reason is not None:
                bar.write(reason, file=sys.stdout)
                sys.stdout.flush()
            bar.update(1)

        broken = check_images(files, args.workers, report)
    seconds = time.perf_counter() - start
    print(f"checked {len(files)} image files in {seconds:.1f} s ({len(files) / max(seconds, 1e-9):.0f}/s, "
          f"{args.workers} worker{'s' if args.workers != 1 else ''}): "
          + (f"{len(broken)} broken" if broken else "all readable"), file=sys.stderr)
    return 1 if broken else 0
