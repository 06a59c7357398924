"""Test images of the committed medical and multi-label runs as files, for `densenet explain` (docs/medical.md).

    python scripts/heatmap_samples.py pneumonia ../shared/data/medmnist/pneumoniamnist.npz OUT_DIR [--count 12]
    python scripts/heatmap_samples.py miml data/miml/miml OUT_DIR [--count 12]
    python scripts/heatmap_samples.py adrenal3d ../shared/data/medmnist/adrenalmnist3d.npz OUT_DIR [--count 12]

Writes OUT_DIR/<true label>/<index>.png (the layout `densenet explain --truth-from-folder` reads): for a MedMNIST
file the first test images of each class in turn (a 3D file: <index>.npy volumes, as `densenet explain` reads
them); for MIML, for each label in turn, the first test images (split.csv) that carry that label alone, so that
the folder names the whole truth. Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def medmnist(npz: Path, out: Path, count: int, names: tuple[str, ...] = ("normal", "pneumonia")) -> None:
    with np.load(npz) as f:
        images, labels = f["test_images"], f["test_labels"].reshape(-1)
    per_class = {c: np.flatnonzero(labels == c)[: -(-count // len(names))] for c in range(len(names))}
    for c, indices in per_class.items():
        (out / names[c]).mkdir(parents=True, exist_ok=True)
        for i in indices:
            if images.ndim == 4:  # (N, D, H, W) volumes
                np.save(out / names[c] / f"{i:04d}.npy", images[i])
            else:
                Image.fromarray(images[i]).save(out / names[c] / f"{i:04d}.png")


def miml(root: Path, out: Path, count: int) -> None:
    with open(root / "split.csv", newline="") as f:
        test = {row["Filenames"] for row in csv.DictReader(f) if row["split"] == "test"}
    with open(root / "labels.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Filenames"] in test]
    names = [name for name in rows[0] if name != "Filenames"]
    per_label = {name: 0 for name in names}
    for row in rows:  # the same number of images of each label, in file order
        on = [name for name in names if row[name] == "1"]
        if len(on) != 1 or per_label[on[0]] >= -(-count // len(names)):
            continue
        (out / on[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "images" / row["Filenames"], out / on[0] / row["Filenames"])
        per_label[on[0]] += 1

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("pneumonia", "miml", "adrenal3d"))
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    if args.kind == "miml":
        miml(args.source, args.out, args.count)
    else:
        names = ("normal", "mass") if args.kind == "adrenal3d" else ("normal", "pneumonia")
        medmnist(args.source, args.out, args.count, names)
