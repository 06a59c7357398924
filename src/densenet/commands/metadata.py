"""What the commands that read weights share: the files they read (``weights_files``, for the output guard), and
flags that attach metadata to weights without it (a plain state dict: no class names, no normalisation), shared
by ``densenet predict`` and ``densenet evaluate``.

    densenet predict plain.safetensors cat.png --metadata-from runs/cifar10-...   # the run that trained it
    densenet predict plain.safetensors cat.png --classes names.txt --mean 0.49 0.48 0.45 --std 0.25 0.24 0.26

Weights a run wrote carry their metadata; these flags are for the others, and override what a file carries.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from densenet.errors import DenseNetError

ATTACHED = ("classes", "mean", "std", "input_size", "dataset")  # what --metadata-from copies
HOW = ("attach it with --metadata-from RUN_DIR (the run that trained these weights), or --classes FILE "
       "--mean M [M ...] --std S [S ...] --input-size N")


def add_metadata_arguments(parser: argparse.ArgumentParser, classes: bool = True) -> None:
    add = parser.add_argument
    add("--metadata-from", metavar="RUN_DIR_OR_WEIGHTS", help="take class names, mean, std, input size and data "
        "set from this run folder or weights file (for weights saved without them)")
    if classes:
        add("--classes", metavar="FILE", help="class names, one a line (UTF-8 text), in the order of the outputs")
    add("--mean", type=float, nargs="+", metavar="M", help="per-channel mean the weights were trained with (0..1)")
    add("--std", type=float, nargs="+", metavar="S", help="per-channel std the weights were trained with (0..1)")
    add("--input-size", type=int, metavar="N", help="the image side the weights were trained on (e.g. 32)")


def metadata_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The metadata the flags give: --metadata-from's, then --classes, --mean and --std over it."""
    given: dict[str, Any] = {}
    if args.metadata_from:
        given.update(read_attached(args.metadata_from))
    if getattr(args, "classes", None):
        given["classes"] = read_classes(args.classes)
    if (args.mean is None) != (args.std is None):
        raise DenseNetError("give --mean and --std together (one value per channel each)")
    if args.mean is not None:
        if len(args.mean) != len(args.std):
            raise DenseNetError(f"--mean has {len(args.mean)} values but --std has {len(args.std)}")
        if not all(s > 0 for s in args.std):
            raise DenseNetError(f"--std values must be positive, not {args.std}")
        given["mean"], given["std"] = list(args.mean), list(args.std)
    if args.input_size is not None:
        if args.input_size < 1:
            raise DenseNetError(f"--input-size must be a positive integer, not {args.input_size}")
        given["input_size"] = args.input_size
    return given


def read_attached(path: str) -> dict[str, Any]:
    """The metadata worth copying (``ATTACHED``) of a run folder or weights file; an error when it has none."""
    from densenet.files import safe_load
    from densenet.models.weights import read_metadata, resolve

    file = resolve(path)
    if file.suffix == ".safetensors":
        metadata = read_metadata(file)
    else:  # a training checkpoint keeps the metadata its weights file gets
        state = safe_load(file, what="checkpoint")
        metadata = dict(state.get("metadata") or {}) if isinstance(state, dict) else {}
    found = {key: metadata[key] for key in ATTACHED if metadata.get(key)}
    if not found:
        raise DenseNetError(f"--metadata-from {path}: {file} carries no metadata (class names, mean, std) to copy")
    return found


def read_classes(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DenseNetError(f"--classes {path}: no such file") from None
    except UnicodeDecodeError:
        raise DenseNetError(f"--classes {path} is not UTF-8 text: give one class name a line") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DenseNetError(f"--classes {path} holds no class names (one a line)")
    return names


def weights_files(weights: str) -> list[Path]:
    """What a command given ``weights`` reads: the path, and the file it names when it is a run folder."""
    from densenet.models.weights import resolve

    if not Path(weights).exists():
        return []  # a published model's name, or a missing file (loading says so)
    files = [Path(weights)]
    try:
        files.append(resolve(weights))
    except DenseNetError:  # a folder without weights: loading it says what is wrong, after this check
        pass
    return files
