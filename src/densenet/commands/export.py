"""``densenet export WEIGHTS_OR_RUN_DIR --format onnx|torchscript|exported --out FILE``.

    densenet export runs/digits --format onnx --out digits.onnx

The work, and what the exported files hold, is ``densenet.deploy.export``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densenet.commands.metadata import weights_files
from densenet.deploy.export import CHECK_BATCHES, FORMATS, check_output_path, export_model
from densenet.errors import DenseNetError
from densenet.files import check_outputs


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="a weights file (.safetensors, torchvision/timm .pth), a run folder, or a "
                        "model name with published ImageNet weights (densenet121, densenet161, densenet169, "
                        "densenet201)")
    parser.add_argument("--format", default=None,
                        help="onnx, torchscript or exported (torch.export); default: from --out's extension "
                             "(.onnx, .pt, .pt2)")
    parser.add_argument("--out", required=True, help="the file to write")


def run_export(args: argparse.Namespace) -> int:
    from densenet.models.weights import load_weights

    fmt = args.format
    if fmt is None:
        by_suffix = {suffix: name for name, suffix in FORMATS.items()}
        fmt = by_suffix.get(Path(args.out).suffix.lower())
        if fmt is None:
            raise DenseNetError(f"say --format onnx, torchscript or exported (cannot tell from {args.out!r})")
    if fmt not in FORMATS:
        raise DenseNetError(f"unsupported export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_output_path(args.out)
    check_outputs([("--out", out)], inputs=weights_files(args.weights), own=[f"*{FORMATS[fmt]}"],
                  command="densenet export")
    model, metadata = load_weights(args.weights)
    worst = export_model(model, metadata, fmt, out)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({fmt}, {size:.1f} MB); checked: logits within {worst:.1e} of PyTorch's "
          f"at batch sizes {' and '.join(map(str, CHECK_BATCHES))}")
    return 0
