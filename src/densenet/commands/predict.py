"""``densenet predict WEIGHTS_OR_RUN_DIR IMAGE_OR_FOLDER...``: the top-k classes of image files or volumes.

    densenet predict runs/digits my_digit.png             # top 5 classes with probabilities
    densenet predict model.safetensors photos/ --top-k 1 --json
    densenet predict runs/adrenal case1.npy scans/        # a 3D model: .npy volumes, and a folder's *.npy

The work is ``densenet.deploy.predict.predict``; its docstring says how images and volumes are prepared. Every
readable file gets its result; the unreadable ones (a .npy file for a 2D model, an image for a 3D one, a volume
of another shape or value range) are listed at the end, one line each on stderr, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from densenet.commands.metadata import HOW, add_metadata_arguments, metadata_from_args
from densenet.deploy.predict import SAID, assumptions, check_inputs, find_images, predict, takes_volumes
from densenet.devices import resolve_device
from densenet.errors import DenseNetError
from densenet.inference.engines import CHOICES


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="a weights file (.safetensors, torchvision/timm .pth), a run folder, or a "
                        "model name with published ImageNet weights (densenet121, densenet161, densenet169, "
                        "densenet201)")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively); for a model "
                        "trained on volumes, .npy files and folders searched for *.npy")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image and line")
    parser.add_argument("--device", default="auto", help="auto (default: cuda when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--engine", choices=CHOICES, default="auto",
                        help="how to run the network (default auto: OpenVINO bf16 on a CPU with native bf16, else "
                             "OpenVINO or ONNX Runtime fp32, each checked against eager, else eager; see `densenet "
                             "bench inference`; eager: plain PyTorch)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="binary and multilabel models: the probability above which a label is given (default: "
                             "the per-label thresholds training chose on validation data, else 0.5)")
    add_metadata_arguments(parser)


def run_predict(args: argparse.Namespace) -> int:
    from densenet.models.weights import load_weights

    if args.top_k < 1:
        raise DenseNetError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise DenseNetError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    check_inputs(args.images)  # every path checked before the model is loaded
    attached = metadata_from_args(args)
    model, metadata = load_weights(args.weights)
    metadata = {**metadata, **attached}
    images = find_images(args.images, volumes=takes_volumes(metadata))  # folders: images, or a 3D model's .npy
    say = lambda line: print(f"densenet predict: {line}", file=sys.stderr)  # noqa: E731 - stdout stays the results
    assumed = assumptions(metadata)
    if assumed:
        missing = ", ".join(key for key in SAID if not metadata.get(key))
        say(f"note: {args.weights} carries no {missing}: assuming {assumed}; {HOW}")
    unreadable = []
    for prediction in predict(model, metadata, images, args.top_k, device, args.batch_size, args.engine, say,
                              threshold=args.threshold):
        if prediction.error is not None:
            unreadable.append(prediction.error)
            if not args.json:
                continue
        if args.json:
            print(json.dumps(prediction.as_json()))
        else:
            print(prediction.image)
            if prediction.task != "multiclass":  # every label's probability, * above its threshold
                for _, name, probability in prediction.classes:
                    mark = "*" if name in prediction.labels else " "
                    print(f"  {probability:8.4f} {mark} {name} (threshold {prediction.thresholds[name]:.4f})")
                given = ", ".join(prediction.labels) or "none"
                print(f"  -> {prediction.decided if prediction.task == 'binary' else given}")
                sys.stdout.flush()
                continue
            for index, name, probability in prediction.classes:
                print(f"  {probability:8.4f}  {name} ({index})")
        sys.stdout.flush()
    for reason in unreadable:  # at the end, where they are seen after the results
        print(f"densenet predict: error: {reason}", file=sys.stderr)
    return 1 if unreadable else 0
