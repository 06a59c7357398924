"""``densenet check-data FOLDER_OR_FILE...``: every broken image file under data folders, before a run meets one.

The work is ``densenet.data.check``; this module is its command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from densenet.data.check import CheckedCache, check_images, image_files
from densenet.data.images import IMAGE_EXTENSIONS
from densenet.errors import DenseNetError
from densenet.files import printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FOLDER_OR_FILE",
                        help="data folders (e.g. data/mine, /imagenet/train) searched recursively, or image files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes decoding in parallel (default: one per CPU core)")
    parser.add_argument("--no-cache", action="store_true",
                        help="decode every file again, even those found readable before and unchanged since")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.workers < 1:
        raise DenseNetError(f"--workers must be at least 1, got {args.workers}")
    # Per folder: its cache, the keys of its files known readable and unchanged, and the files to decode.
    groups: list[tuple[CheckedCache | None, np.ndarray, list[Path]]] = []
    keys: dict[Path, int] = {}
    skipped = 0
    for item in map(Path, args.paths):
        if item.is_dir():
            cache = CheckedCache(item)
            files = image_files(item)
            current = np.array([keys.setdefault(p, cache.key(p)) for p in files], dtype=np.uint64)
            known = np.isin(current, np.empty(0, dtype=np.uint64) if args.no_cache else cache.load())
            skipped += int(known.sum())
            groups.append((cache, current[known], [p for p, k in zip(files, known, strict=True) if not k]))
        elif item.exists():
            groups.append((None, np.empty(0, dtype=np.uint64), [item]))
        else:
            raise DenseNetError(f"{printable(item)}: no such file or folder")
    todo = [p for _, _, files in groups for p in files]
    if not todo and not skipped:
        raise DenseNetError(f"no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) under "
                            f"{', '.join(map(printable, args.paths))}")
    broken_paths: set[Path] = set()
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc="checking", disable=args.quiet, file=sys.stderr,
              mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True) as bar:

        def report(path: Path, reason: str | None) -> None:
            if reason is not None:
                broken_paths.add(path)
                bar.write(reason, file=sys.stdout)
                sys.stdout.flush()
            bar.update(1)

        broken = check_images(todo, args.workers, report)
    seconds = time.perf_counter() - start
    for cache, known, files in groups:
        if cache is not None:  # what is readable now: the unchanged known files and the new ones that decoded
            cache.save(np.concatenate([known, np.array([keys[p] for p in files if p not in broken_paths],
                                                       dtype=np.uint64)]))
    unchanged = (f"; {skipped} more unchanged since they were last found readable (--no-cache decodes them too)"
                 if skipped else "")
    print(f"checked {len(todo)} image files in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.0f}/s, "
          f"{args.workers} worker{'s' if args.workers != 1 else ''}): "
          + (f"{len(broken)} broken" if broken else "all readable") + unchanged, file=sys.stderr)
    return 1 if broken else 0
