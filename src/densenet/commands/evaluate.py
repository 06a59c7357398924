"""``densenet evaluate``: top-1 and top-5 error of trained weights on a data set's test split.

    densenet evaluate runs/digits-densenet_bc40_k12-20260101-120000
    densenet evaluate model.safetensors --dataset imagenet --data-dir /imagenet --ten-crop --json
    densenet evaluate densenet121 --dataset imagenet --data-dir /imagenet     # torchvision's ImageNet weights

The work is ``densenet.training.evaluate.evaluate_weights``; its docstring says what is evaluated how.
"""

from __future__ import annotations

import argparse
import json
import sys

from densenet.commands.metadata import HOW, add_metadata_arguments, metadata_from_args
from densenet.data.augment import TTA_VIEWS
from densenet.data.registry import DATASETS
from densenet.errors import DenseNetError
from densenet.inference.engines import CHOICES
from densenet.training.evaluate import evaluate_weights


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("weights", nargs="?", metavar="RUN_DIR_OR_WEIGHTS",
        help="a run folder, a model.safetensors, a checkpoint, torchvision/timm weights, or a model name "
             "with published ImageNet weights (densenet121, densenet161, densenet169, densenet201)")
    add("--checkpoint", metavar="RUN_DIR_OR_WEIGHTS", help="the same, as an option")
    add("--dataset", help=f"one of {', '.join(DATASETS)} (default: the one the weights were trained on)")
    add("--data-dir", help="where the data set is (default data/<dataset>)")
    add("--batch-size", type=int, default=128)
    add("--workers", type=int, default=4)
    add("--device", choices=["cpu", "cuda", "auto"], default="auto")
    add("--ten-crop", action="store_true", help="ImageNet/folders: average the ten crops (resize 256, crop 224)")
    add("--tta", choices=list(TTA_VIEWS), default=None, help="default: the run's own (recorded in the weights or "
        "its config.yaml; none if not recorded); flip: average the softmax of each image and its mirror image; "
        "flip-shift: also of both moved one pixel down-right and up-left (as densenet train --tta evaluates); "
        "none: one view")
    add("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast (default none: fp32)")
    add("--engine", choices=CHOICES, default="auto", help="how to run the network (default auto: OpenVINO "
        "bf16 on a CPU with native bf16, else OpenVINO or ONNX Runtime fp32, each checked against eager, else eager; "
        "eager: plain PyTorch, the error train reported)")
    add("--json", action="store_true", help="print one JSON object: top1_error, top5_error (percent), n, ...; "
        "binary and multilabel models: metrics (auroc, acc, map, hamming, f1_macro, per-label auroc/ and ap/, ...)")
    add("--threshold", type=float, default=None, help="binary and multilabel models: the probability above which a "
        "label counts as given, for ACC, Hamming loss and F1 (default 0.5, as MedMNIST measures ACC)")
    add_metadata_arguments(parser, classes=False)  # the class names are the data set's


def run_evaluate(args: argparse.Namespace) -> int:
    if bool(args.weights) == bool(args.checkpoint):
        raise DenseNetError("give the weights to evaluate once: densenet evaluate RUN_DIR_OR_WEIGHTS (or --checkpoint)")
    result = evaluate_weights(args.weights or args.checkpoint, args.dataset, args.data_dir, batch_size=args.batch_size,
                              workers=args.workers, device=args.device, ten_crop=args.ten_crop, tta=args.tta,
                              amp=args.amp, engine=args.engine, metadata=metadata_from_args(args),
                              threshold=args.threshold)
    if result["assumed"]:
        how = HOW.replace(" --classes FILE", "").replace(" --input-size N", "")  # the data set gives names and size
        print(f"densenet evaluate: note: {args.weights or args.checkpoint} carries no preprocessing: "
              f"{result['assumed']}; if it was trained otherwise, {how}", file=sys.stderr)
    if result["engine_note"] and not args.json:
        print(f"densenet evaluate: {result['engine_note']}", file=sys.stderr)
    if result["tta"] != "none" and result["tta_source"] != "given" and not args.json:
        print(f"densenet evaluate: test-time augmentation {result['tta']}, as the run evaluated (from "
              f"{result['tta_source']}; --tta none evaluates one view)", file=sys.stderr)
    if args.json:
        print(json.dumps(result, allow_nan=False))  # valid JSON: a diverged model's errors are null
    elif not result["diverged"] and result.get("metrics") is not None:
        _print_task(result)
    elif not result["diverged"]:
        views = {"flip": " (image and mirror averaged)", "flip-shift": " (6 views averaged: flip-shift)"}
        crop = " (ten-crop)" if result["ten_crop"] else views.get(result["tta"], "")
        print(f"{result['model']} on {result['dataset']} test ({result['n']} images){crop}: "
              f"top-1 error {result['top1_error']:.2f}%, top-5 error {result['top5_error']:.2f}% "
              f"({result['engine']} engine)")
    if result["diverged"]:
        print(f"densenet evaluate: error: the weights diverged: the loss on {result['dataset']} is not finite "
              f"(NaN or infinite outputs), so there is no error rate; evaluate an earlier checkpoint",
              file=sys.stderr)
        return 1
    return 0


SHOWN = (("auroc", "AUROC"), ("acc", "ACC"), ("map", "mAP"), ("lrap", "LRAP (ranking AP)"),
         ("hamming", "Hamming loss"), ("f1_macro", "F1 (macro)"), ("f1_micro", "F1 (micro)"), ("f1", "F1"))


def _print_task(result: dict) -> None:
    """A binary or multilabel evaluation: the averaged measures, then AUROC and AP per label."""
    metrics = result["metrics"]
    views = {"flip": ", image and mirror averaged", "flip-shift": ", 6 views averaged"}.get(result["tta"], "")
    print(f"{result['model']} on {result['dataset']} test ({result['n']} images, {result['task']}, threshold "
          f"{result['threshold']:g}{views}; {result['engine']} engine)")
    for key, label in SHOWN:
        if key in metrics:
            value = metrics[key]
            print(f"  {label:<18} {'n/a' if value is None else f'{value:.4f}'}")
    if metrics.get("auroc_skipped"):
        print(f"  ({int(metrics['auroc_skipped'])} label(s) with one class only in the test split: left out of "
              f"AUROC and mAP)")
    if len(result["labels"]) > 1 or result["task"] == "multilabel":
        width = max(5, *(len(name) for name in result["labels"]))
        print(f"  {'label':<{width}}  {'AUROC':>7}  {'AP':>7}")
        for name in result["labels"]:
            auc, ap = metrics.get(f"auroc/{name}"), metrics.get(f"ap/{name}")
            print(f"  {name:<{width}}  {'n/a' if auc is None else f'{auc:.4f}':>7}  "
                  f"{'n/a' if ap is None else f'{ap:.4f}':>7}")
