"""``densenet bench inference``: each inference engine's top-1 accuracy and throughput on a real test set.

Every engine of ``densenet.inference.engines`` runs over the same test images (batch 64) with the same
trained weights; the int8 engine is calibrated on training images. Throughput is timed on the test set
itself, engines interleaved batch by batch with the baseline (our eager fp32 model; it computes what
torchvision's DenseNet computes, and for a DenseNet-BC torchvision's own model is timed beside it).

    densenet bench inference --weights runs/c10/model.safetensors --data data/cifar10 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from densenet.errors import ConfigError
from densenet.inference.engines import ENGINES, build_engine
from densenet.models.densenet import DenseNet


def evaluate_engines(model: DenseNet, images: torch.Tensor, labels: torch.Tensor, engines: list[str],
                     calibration: torch.Tensor, batch_size: int = 64, reference: torch.nn.Module | None = None,
                     ) -> list[dict]:
    """Top-1 accuracy (%) and median images/s of each engine over float ``images``; the first is the baseline."""
    model = model.eval()
    runners = {"baseline (eager fp32)": model}
    if reference is not None:
        runners["torchvision eager fp32"] = reference.eval()
    for name in engines:
        runners[name] = build_engine(model, name, example=images[:batch_size], calibration=calibration)
    correct = {name: 0 for name in runners}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    batches = images.split(batch_size)
    for index, (x, y) in enumerate(zip(batches, labels.split(batch_size), strict=True)):
        order = list(runners) if index % 2 == 0 else list(reversed(runners))
        for name in order:
            start = time.perf_counter()
            with torch.no_grad():
                logits = runners[name](x)
            seconds[name].append(time.perf_counter() - start)
            correct[name] += int((logits.argmax(1) == y).sum())
    base = statistics.median(seconds["baseline (eager fp32)"][1:] or seconds["baseline (eager fp32)"])
    rows = []
    for name in runners:
        per_batch = statistics.median(seconds[name][1:] or seconds[name])  # the first batch warms up
        rows.append(dict(engine=name, top1=100.0 * correct[name] / len(labels), images_per_s=batch_size / per_batch,
                         speedup=base / per_batch))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="a weights file or run folder (densenet train's output)")
    parser.add_argument("--data", default="data/cifar10", help="CIFAR-10 folder: train/ and test/ class folders")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["folded", "onnxruntime",
                                                                          "onnxruntime-int8"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate N test images only (a seeded sample)")
    parser.add_argument("--calibration-images", type=int, default=512, help="training images for int8 calibration")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-torchvision", action="store_true",
                        help="skip timing torchvision's twin (it computes what the baseline computes)")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from densenet.data.augment import normalize
    from densenet.data.datasets import load_data
    from densenet.models.weights import load_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    model, metadata = load_weights(args.weights)
    data = load_data(args.dataset, args.data, train=True)
    if data.num_classes != model.num_classes:
        raise ConfigError(f"{args.weights} has {model.num_classes} classes but {args.data} has {data.num_classes}")
    mean, std = metadata.get("mean") or data.mean, metadata.get("std") or data.std
    test = data.test
    count = min(args.limit or len(test), len(test))
    generator = torch.Generator().manual_seed(0)
    # a seeded sample of every class when limited (the files are sorted by class)
    subset = torch.randperm(len(test), generator=generator)[:count].sort().values if count < len(test) else None
    images = normalize(test.images if subset is None else test.images[subset], mean, std)
    labels = test.labels if subset is None else test.labels[subset]
    pick = torch.randperm(len(data.train), generator=generator)[:args.calibration_images]
    calibration = normalize(data.train.images[pick], mean, std)
    reference = None
    if not args.no_torchvision:
        from densenet.bench.speed import torchvision_reference

        try:
            reference = torchvision_reference(model)
        except ConfigError:
            pass  # not a DenseNet-BC: torchvision has no such network; the baseline is ours, eager
    rows = evaluate_engines(model, images, labels, args.engines, calibration, args.batch_size, reference)
    report = dict(weights=str(args.weights), model=metadata.get("model"), test_images=count,
                  threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  results=rows)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {count} {args.dataset} test images, batch {args.batch_size}, "
          f"{report['threads']} threads, {report['date']}")
    print("\n| engine | top-1 % | img/s | speed-up vs eager fp32 |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['top1']:.2f} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x |")
    return 0
