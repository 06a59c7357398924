"""``densenet explain WEIGHTS_OR_RUN_DIR IMAGE_OR_FOLDER... --out DIR``: heat maps of where the network looked.

    densenet explain runs/pneumonia xray1.png xray2.png --out heatmaps --sheet     # CAM of the predicted label
    densenet explain runs/miml photos/ --out maps --method gradcam --layer denseblock3 --label sea
    densenet explain runs/adrenal case1.npy scans/ --out maps     # a 3D model: .npy volumes, drawn as slices

Writes DIR/NAME.METHOD.png per image (the image with the map over it, titled with the label and its
probability; a volume as a grid of slices) and, with --sheet, DIR/sheet.METHOD.png (every image in a grid; a
volume by its slice of highest score). Weights, images and volumes are read as ``densenet predict`` reads them
(the weights' metadata gives the input size, channels, normalisation and whether the model takes 2D images or
.npy volumes; a folder is searched for the one or the other). A file the model cannot take (a .npy file for a
2D model, an image for a 3D one, a volume of another shape or value range) stops the command with one line
naming it. The work, and what CAM and Grad-CAM compute, is ``densenet.analysis.explain``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from densenet.analysis.explain import METHODS, explain, task_from_metadata
from densenet.deploy.predict import Preprocess, check_inputs, find_images, same_shape, takes_volumes
from densenet.devices import resolve_device
from densenet.errors import DenseNetError
from densenet.files import check_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="a weights file (.safetensors, torchvision/timm .pth), a run folder, or a "
                        "model name with published ImageNet weights (densenet121, ...)")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively); for a model "
                        "trained on volumes, .npy files and folders searched for *.npy")
    parser.add_argument("--out", required=True, help="folder for the PNGs (created if needed)")
    parser.add_argument("--method", choices=METHODS, default="cam",
                        help="cam (default): exact for the global-pooling + linear head, from the last maps; "
                             "gradcam: any block, chosen with --layer")
    parser.add_argument("--layer", default=None,
                        help="the block Grad-CAM reads (denseblock1, denseblock2, ..., norm5 = the last maps, or an "
                             "index: 0, 1, ..., -1); default the last")
    parser.add_argument("--label", default=None,
                        help="the label to explain, by name (default: the predicted one; a one-logit binary model: "
                             "the positive one)")
    parser.add_argument("--sheet", action="store_true", help="also a contact sheet of every image")
    parser.add_argument("--truth-from-folder", action="store_true",
                        help="each image's true label is the name of its folder (ROOT/LABEL/image.png, as image "
                             "folder data sets are laid out); the sheet marks each prediction right or wrong")
    parser.add_argument("--device", default="auto", help="auto (default: cuda when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    from densenet.commands.metadata import weights_files
    from densenet.models.weights import load_weights

    if args.batch_size < 1:
        raise DenseNetError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    check_inputs(args.images)  # every path checked before the model is loaded
    model, metadata = load_weights(args.weights)
    images = find_images(args.images, volumes=takes_volumes(metadata))  # folders: images, or a 3D model's .npy
    preprocess = Preprocess.from_metadata(metadata)
    out = Path(args.out)  # NAME.METHOD.png per image (made unique) and the sheet: never over an input or run file
    outputs = [("--out", out / f"{stem}.{args.method}.png") for stem in dict.fromkeys(p.stem for p in images)]
    check_outputs(outputs + ([("--out", out / f"sheet.{args.method}.png")] if args.sheet else []),
                  inputs=[*weights_files(args.weights), *images], own=[f"*.{args.method}.png"],
                  command="densenet explain")
    model = model.to(device)
    truths = None
    if args.truth_from_folder:
        names = task_from_metadata(metadata, int(metadata["config"]["num_classes"])).names
        truths = [p.parent.name for p in images]
        for path, truth in zip(images, truths, strict=True):
            if truth not in names:
                raise DenseNetError(f"--truth-from-folder: {path} is in folder {truth!r}, which is not one of this "
                                    f"model's labels ({', '.join(names)})")

    def batches() -> Iterator[torch.Tensor]:  # decoded a batch at a time, as predict does
        shape = None
        for start in range(0, len(images), args.batch_size):
            tensors = []
            for path in images[start:start + args.batch_size]:
                tensors.append(preprocess(path))
                shape = same_shape(path, tensors[-1], shape,  # volumes kept at their size (no input_size)
                                   "weights without an input size take volumes of one shape")
            yield torch.stack(tensors).to(device)

    written = explain(model, batches(), Path(args.out), metadata, args.method, args.layer, args.label,
                      names=[str(p) for p in images], true_labels=truths, sheet=args.sheet,
                      batch_size=args.batch_size)
    for path in written:
        print(path)
    what = "CAM" if args.method == "cam" else f"Grad-CAM at {args.layer or 'the last block'}"
    print(f"densenet explain: {what} of {args.label or 'the predicted label'} for {len(images)} image(s) in "
          f"{args.out}", file=sys.stderr)
    return 0
