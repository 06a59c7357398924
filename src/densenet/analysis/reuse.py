"""Feature reuse, the paper's Figure 5: how strongly each layer of a dense block reads each earlier layer.

    densenet analyze reuse runs/cifar10 --out docs/reuse     # reuse.png (one panel per block), reuse.csv

Inside dense block b with L layers, layer l (1..L) reads the concatenation [x_0, x_1, ..., x_{l-1}]:
x_0 is the block's input (c_0 maps), every x_s after it the k maps of layer s. The convolution that reads
this concatenation is layer l's 3x3 ``conv2`` for a basic layer and its 1x1 ``conv1`` for a bottleneck
layer. Target L+1 is the transition's 1x1 convolution (after the last block: the classifier), which
reads [x_0, ..., x_L].

For a target with weight W of shape (out, in, kh, kw) (the classifier: (out, in, 1, 1)), the weights
that connect source s to it are W[:, channels of s], with n_s input maps (c_0 for s = 0, k otherwise).
The pixel (s, l) is their mean absolute value:

    A[s, l] = sum(|W[:, channels of s, :, :]|) / (n_s * out * kh * kw)

that is the L1 norm of the connecting weights normalised by the number of input feature maps n_s (the
paper's normalisation, which makes the block input's c_0 maps comparable with a layer's k), and by the
weights each input map has (out * kh * kw), so that a 3x3 layer, a 1x1 bottleneck, a transition and the
classifier share one per-weight scale. The CSV also gives the plain sum and n_s, for any other choice.
Pixels with s >= l are not connections and stay empty. Colours are scaled per block, as in the paper.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from densenet.errors import DenseNetError
from densenet.files import figure_png
from densenet.models.densenet import DenseNet


@dataclass
class BlockReuse:
    """One dense block's heat map: rows are sources s = 0..L, columns targets l = 1..L+1 (index l - 1)."""

    block: int  # 1-based
    targets: list[str]  # module names of targets 1..L+1
    source_maps: list[int]  # n_s for s = 0..L
    mean_abs: np.ndarray  # (L+1, L+1); NaN where s >= l
    sum_abs: np.ndarray  # same shape: the L1 norm of the connecting weights

    @property
    def num_layers(self) -> int:
        return len(self.source_maps) - 1


def reading_weight(module: nn.Module) -> torch.Tensor:
    """The weight of the convolution (or linear layer) that reads a concatenation, as (out, in, kh, kw)."""
    weight = module.weight.detach().float().cpu()
    return weight[:, :, None, None] if weight.dim() == 2 else weight


def feature_reuse(model: DenseNet) -> list[BlockReuse]:
    """The Figure-5 matrices of every dense block of a (trained) DenseNet."""
    names = dict(model.features.named_children())
    blocks = model.dense_blocks()
    results = []
    for b, block in enumerate(blocks, start=1):
        layers = list(block.items())
        num_layers, growth, c0 = len(layers), block.growth_rate, block.in_channels
        targets: list[tuple[str, nn.Module]] = [
            (f"features.denseblock{b}.{name}.{'conv1' if layer.bottleneck else 'conv2'}",
             layer.conv1 if layer.bottleneck else layer.conv2) for name, layer in layers]
        if b < len(blocks):
            targets.append((f"features.transition{b}.conv", names[f"transition{b}"].conv))
        elif isinstance(model.classifier, nn.Linear):
            targets.append(("classifier", model.classifier))
        maps = [c0] + [growth] * num_layers
        starts = np.concatenate([[0], np.cumsum(maps)])
        mean_abs = np.full((num_layers + 1, num_layers + 1), np.nan)
        sum_abs = np.full_like(mean_abs, np.nan)
        for column, (name, module) in enumerate(targets):
            weight = reading_weight(module).abs()
            expected = int(starts[column + 1])  # target l = column + 1 reads sources 0..l-1
            if weight.shape[1] != expected:
                raise DenseNetError(f"{name} reads {weight.shape[1]} maps, expected {expected}: not a DenseNet block")
            per_map = weight.shape[0] * weight.shape[2] * weight.shape[3]
            for s in range(column + 1):
                total = float(weight[:, starts[s]:starts[s + 1]].sum(dtype=torch.float64))
                sum_abs[s, column] = total
                mean_abs[s, column] = total / (maps[s] * per_map)
        results.append(BlockReuse(b, [name for name, _ in targets], maps, mean_abs, sum_abs))
    return results


def to_csv(blocks: list[BlockReuse]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["block", "source", "target", "target_module", "source_maps", "sum_abs_weight",
                     "mean_abs_weight"])
    for r in blocks:
        for column, module in enumerate(r.targets):
            for s in range(column + 1):
                writer.writerow([r.block, s, column + 1, module, r.source_maps[s], f"{r.sum_abs[s, column]:.8g}",
                                 f"{r.mean_abs[s, column]:.8g}"])
    return out.getvalue()


def plot(blocks: list[BlockReuse], title: str = "") -> bytes:
    """One heat map per dense block, like the paper's Figure 5, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 4.0), squeeze=False)
    for ax, r in zip(axes[0], blocks, strict=True):
        columns = len(r.targets)
        data = np.ma.masked_invalid(r.mean_abs[:, :columns])
        image = ax.imshow(data, cmap="jet", interpolation="nearest", aspect="equal")
        last = "T" if "transition" in r.targets[-1] else ("C" if r.targets[-1] == "classifier" else "")
        step = math.ceil((r.num_layers + 1) / 13)  # every layer up to L = 12 (the paper's), fewer beyond
        xticks = sorted(set(range(0, columns - 1, step)) | {columns - 1})
        if step > 1 and columns - 2 in xticks:
            xticks.remove(columns - 2)  # keep the T/C label clear of its neighbour
        ax.set_xticks(xticks, [str(i + 1) if i < r.num_layers else last for i in xticks])
        ax.set_yticks(list(range(0, r.num_layers + 1, step)))
        ax.set_xlabel("target layer (ℓ)" + (";  T: transition" if last == "T" else ";  C: classifier"
                                             if last == "C" else ""))
        ax.set_ylabel("source layer (s)")
        ax.set_title(f"Dense block {r.block}")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig, dpi=120)


def write_reuse(model: DenseNet, out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """reuse.csv and reuse.png in out_dir (created if needed), each written atomically."""
    from densenet.files import atomic_write

    out_dir = Path(out_dir)
    blocks = feature_reuse(model)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = out_dir / "reuse.csv", out_dir / "reuse.png"
        atomic_write(csv_path, lambda f: f.write(to_csv(blocks).encode()))
        png = plot(blocks, title)
        atomic_write(png_path, lambda f: f.write(png))
    except OSError as exc:
        raise DenseNetError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return csv_path, png_path
