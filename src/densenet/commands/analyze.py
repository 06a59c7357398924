"""``densenet analyze ANALYSIS ...``: analyses of a trained model.

    densenet analyze reuse runs/cifar10 --out docs/reuse     # the paper's Figure 5: reuse.png, reuse.csv
    densenet analyze figure4 runs/figure4/* --out docs/figure4   # Figure 4: figure4.png, curves.png, figure4.md

The work is ``densenet.analysis.reuse`` and ``densenet.analysis.figure4``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from densenet.analysis.reuse import feature_reuse, write_reuse
from densenet.files import check_outputs

# name -> (module with add_NAME_arguments/run_NAME, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "reuse": ("densenet.commands.analyze", "the paper's Figure 5: feature reuse inside each dense block"),
    "figure4": ("densenet.commands.analyze", "the paper's Figure 4: DenseNets against ResNets, from run folders"),
}
DEST = "analysis"

def add_reuse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Mean absolute weight from each source layer s to each target layer l of every dense block, "
                          "as reuse.png and reuse.csv.")
    parser.add_argument("weights", help="a weights file or run folder")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--title", default=None, help="figure title (default: model and data set)")


def run_reuse(args: argparse.Namespace) -> int:
    from densenet.commands.metadata import weights_files
    from densenet.models.weights import load_weights

    out = Path(args.out)
    check_outputs([("--out", out / "reuse.png"), ("--out", out / "reuse.csv")], inputs=weights_files(args.weights),
                  own=["reuse.png", "reuse.csv"], command="densenet analyze reuse")
    model, metadata = load_weights(args.weights)
    title = args.title if args.title is not None else " on ".join(
        str(metadata[k]) for k in ("model", "dataset") if metadata.get(k))
    csv_path, png_path = write_reuse(model, args.out, title)
    for r in feature_reuse(model):
        own = np.nanmean(np.diag(r.mean_abs)[: r.num_layers])  # each layer reading its direct predecessor
        first = np.nanmean(r.mean_abs[0, : r.num_layers])  # each layer reading the block input
        print(f"block {r.block}: {r.num_layers} layers; mean |w| from the previous layer {own:.4g}, "
              f"from the block input {first:.4g}, into {r.targets[-1]} {np.nanmean(r.mean_abs[:, -1]):.4g}")
    print(f"wrote {png_path} and {csv_path}")
    return 0


def add_figure4_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Test error against parameters, forward MACs and wall-clock minutes, one marker per network "
                          "(figure4.png), the curves of the best DenseNet-BC beside the ResNet of closest error "
                          "(curves.png), and the table (figure4.md).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders made by `densenet train`")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")


def run_figure4(args: argparse.Namespace) -> int:
    from densenet.analysis.figure4 import OUTPUTS, markdown, read_run, write_figure4

    out = Path(args.out)  # never over a run's own curves.png, config.yaml or metrics.csv
    check_outputs([("--out", out / name) for name in OUTPUTS],
                  inputs=[Path(run) / name for run in args.runs for name in ("config.yaml", "metrics.csv")],
                  own=list(OUTPUTS), command="densenet analyze figure4")
    runs = [read_run(run) for run in args.runs]
    command = "densenet analyze figure4 " + " ".join(args.runs) + f" --out {args.out}"
    print(markdown(runs), end="")
    print("wrote " + ", ".join(map(str, write_figure4(runs, args.out, command))))
    return 0
