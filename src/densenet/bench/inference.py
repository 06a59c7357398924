"""``densenet bench inference``: each inference engine's top-1, agreement with eager, build time and speed.

    densenet bench inference docs/runs/cifar10-densenet_bc40_k12-cpu --data data/cifar10
    densenet bench inference --model densenet121 --input-size 224 --limit 256 --data data/cifar10

Every engine of ``densenet.inference.engines`` runs over the same test images with the same weights, beside
torchvision's eager DenseNet fp32 with those weights (the reference of the speed-ups) and our eager model (the
reference of the agreement: the share of images whose top class is eager's, and the largest logit
difference). Throughput is timed at ``--batch-size`` over the whole set, engines interleaved batch by batch so
that a busy neighbour slows all alike; latency is the median of ``--latency-images`` single-image calls, also
interleaved, each after an untimed call of the same engine on the same image (so that the engine switched
from has stopped spinning its threads and this one's are awake, as in a process running one engine). Build
time (export, quantisation, compilation) is reported beside the speed, with whether the built files came from
the on-disk cache. int8 engines are calibrated on ``--calibration-images`` training images. The peak of an
fp32 matrix product is timed just before and just after the timing: far below the usual, the machine was busy.
The default engine, ``auto``, is built as ``densenet predict`` and ``densenet evaluate`` build it, and named.

``--model NAME`` times a named network with seeded random weights instead (no trained weights needed), its BN
statistics measured on the calibration images: the speed and the agreement with eager mean what they say, the
top-1 is chance. ``--input-size`` resizes the test images (bilinear), e.g. CIFAR-10's to 224 for an
ImageNet-sized network. Streamed data sets (imagenet, folder) are decoded into memory first: ``--limit`` images
of them, 512 unless given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import Tensor, nn

from densenet.devices import cpu_model
from densenet.errors import ConfigError, DenseNetError
from densenet.inference.engines import ENGINES, Engine, build_engine, calibration_images, missing_package

TORCHVISION = "torchvision eager fp32"
EAGER = "eager"
STREAMED_LIMIT = 512


def measure(engines: dict[str, Engine], images: Tensor, labels: Tensor, batch_size: int,
            latency_engines: dict[str, Engine] | None = None, latency_images: int = 0) -> list[dict]:
    """One row per engine: top-1 %, agreement with ``EAGER`` (which ``engines`` must hold), speed and latency."""
    top = {name: [] for name in engines}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for index, batch in enumerate(images.split(batch_size)):
        order = list(engines) if index % 2 == 0 else list(reversed(engines))  # fair under a changing load
        for name in order:
            start = time.perf_counter()
            logits = engines[name](batch)
            seconds[name].append(time.perf_counter() - start)
            top[name].append(logits.float())
    latency: dict[str, list[float]] = {name: [] for name in latency_engines or {}}
    for index, image in enumerate(images[:latency_images].split(1) if latency_engines else []):
        order = list(latency_engines) if index % 2 == 0 else list(reversed(latency_engines))
        for name in order:
            # untimed first: the engine before may leave its threads spinning (ONNX Runtime's pool does), and
            # this one's may have gone to sleep; one call lets both settle, as for a process running one engine
            latency_engines[name](image)
            start = time.perf_counter()
            latency_engines[name](image)
            latency[name].append(time.perf_counter() - start)
    eager = torch.cat(top[EAGER])
    reference = TORCHVISION if TORCHVISION in engines else EAGER
    sizes = [len(batch) for batch in images.split(batch_size)]

    def per_image(name: str) -> float:  # median seconds per image over the batches; the first one warms up
        rates = [t / n for t, n in zip(seconds[name], sizes, strict=True)]
        return statistics.median(rates[1:] or rates)

    base = per_image(reference)
    base_latency = statistics.median(latency[reference][1:]) if latency.get(reference, [])[1:] else None
    rows = []
    for name, engine in engines.items():
        logits = torch.cat(top[name])
        seconds_per_image = per_image(name)
        row = dict(engine=name, top1=100.0 * float((logits.argmax(1) == labels).float().mean()),
                   agrees_with_eager=100.0 * float((logits.argmax(1) == eager.argmax(1)).float().mean()),
                   max_logit_difference=float((logits - eager).abs().max()),
                   build_seconds=engine.build_seconds, from_cache=engine.from_cache,
                   images_per_s=1 / seconds_per_image, speedup=base / seconds_per_image)
        if latency.get(name, [])[1:]:
            row["latency_ms"] = 1000 * statistics.median(latency[name][1:])
            row["latency_build_seconds"] = latency_engines[name].build_seconds
            if base_latency:
                row["latency_speedup"] = base_latency / (row["latency_ms"] / 1000)
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("weights", nargs="?", metavar="RUN_DIR_OR_WEIGHTS", help="a run folder or weights file (densenet train's)")
    add("--weights", dest="weights_option", metavar="RUN_DIR_OR_WEIGHTS", help="the same, as an option")
    add("--model", help="a named network with seeded random weights (speed and agreement only), e.g. densenet121")
    add("--data", default=None, help="the data set's folder (default data/<dataset>)")
    add("--dataset", default=None, help="default: the weights' data set, else cifar10")
    add("--engines", nargs="+", choices=ENGINES, default=None,
        help="default: every engine whose package is installed")
    add("--limit", type=int, default=None, help=f"N test images only, a seeded sample (streamed sets: "
        f"{STREAMED_LIMIT} unless given)")
    add("--input-size", type=int, default=None, help="resize the test images to this size (bilinear)")
    add("--calibration-images", type=int, default=512, help="training images for int8 calibration")
    add("--batch-size", type=int, default=64)
    add("--latency-images", type=int, default=100, help="single-image calls per engine for the latency; 0: none")
    add("--threads", type=int, default=None)
    add("--no-torchvision", action="store_true", help="skip torchvision's twin (speed-ups are then against ours)")
    add("--no-cache", action="store_true", help="build every engine afresh, in a temporary folder")
    add("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, metadata, weights = _network(args)
    dataset = args.dataset or metadata.get("dataset") or "cifar10"
    data = _load_with_train(dataset, args.data, args.input_size)
    if model is None:  # --model: random weights, as many classes as the data set
        model = _random_network(args.model, data.num_classes)
    if data.num_classes != model.num_classes:
        raise ConfigError(f"{weights} has {model.num_classes} classes but {dataset} has {data.num_classes}")
    mean, std = metadata.get("mean") or data.mean, metadata.get("std") or data.std
    images, labels = _test_images(data, args.limit, mean, std)
    engines_asked = args.engines or [e for e in ENGINES if e != "eager" and not missing_package(e)]
    needs_calibration = any(e.endswith("-int8") for e in engines_asked)
    calibration = (calibration_images(data.train, args.calibration_images, mean, std)
                   if needs_calibration and data.train is not None and args.calibration_images > 0 else None)
    if args.input_size and images.shape[-1] != args.input_size:
        images = _resize(images, args.input_size)
        calibration = _resize(calibration, args.input_size) if calibration is not None else None
    if args.model:  # random weights: BN statistics measured on images, so that activations have a sane scale
        _settle_batchnorm(model, calibration if calibration is not None else images[:256], args.batch_size)
    model = model.eval()
    cache = not args.no_cache
    example = images[:args.batch_size]
    engines: dict[str, Engine] = {}
    reference = None if args.no_torchvision else _torchvision(model)
    if reference is not None:
        engines[TORCHVISION] = Engine(TORCHVISION, reference.eval(), 0.0)
    engines[EAGER] = build_engine(model, "eager", example)
    for name in engines_asked:
        if name != EAGER:
            engines[name] = build_engine(model, name, example, calibration=calibration, cache=cache)
    latency_engines = {name: engine for name, engine in engines.items() if name != "compile"}
    if "compile" in engines and args.latency_images:  # compiled for one batch size: a second graph for batch 1
        latency_engines["compile"] = build_engine(model, "compile", images[:1], cache=cache)
    auto = build_engine(model, "auto", example, cache=cache)
    peak_before = _fp32_peak()
    rows = measure(engines, images, labels, args.batch_size, latency_engines, args.latency_images)
    peaks = [peak_before, _fp32_peak()]
    report = dict(weights=weights, model=metadata.get("model"), dataset=dataset, test_images=len(labels),
                  input_size=int(images.shape[-1]), batch_size=args.batch_size, threads=torch.get_num_threads(),
                  cpu=cpu_model(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  matmul_peak_gflops=[round(p / 1e9, 1) for p in peaks], auto=auto.name, auto_note=auto.note,
                  results=rows)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} ({weights}) on {len(labels)} {dataset} test images at {report['input_size']} px, "
          f"batch {args.batch_size}, {report['threads']} threads, {report['cpu']}, {report['date']}; fp32 matmul "
          f"peak {' and '.join(f'{p:.0f}' for p in report['matmul_peak_gflops'])} GFLOP/s before and after timing")
    print("\n| engine | top-1 % | agrees with eager % | max logit diff | build s | img/s | speed-up | "
          "batch-1 ms | speed-up |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        build = f"{r['build_seconds']:.1f}" + (" (cache)" if r["from_cache"] else "")
        latency = (f"{r['latency_ms']:.2f} | {r.get('latency_speedup', 1.0):.2f}x" if "latency_ms" in r
                   else "- | -")
        name = r["engine"] + (" (default)" if r["engine"] == auto.name else "")
        print(f"| {name} | {r['top1']:.2f} | {r['agrees_with_eager']:.2f} | {r['max_logit_difference']:.1e} "
              f"| {build} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | {latency} |")
    reference_name = TORCHVISION if reference is not None else "our eager"
    print(f"\nspeed-ups against {reference_name}; the default engine (auto, of predict and evaluate) runs "
          f"{auto.name} here" + (f" ({auto.note})" if auto.note else ""))
    return 0


def _fp32_peak() -> float:
    """FLOP/s of an fp32 matrix product, timed here: far below the CPU's usual figure, something else ran."""
    from densenet.devices import matmul_peak

    return matmul_peak(torch.device("cpu"), "fp32")


def _network(args: argparse.Namespace) -> tuple[nn.Module | None, dict, str]:
    """The trained model and its metadata, or (None, {"model": name}, ...) for --model NAME."""
    weights = args.weights or args.weights_option
    if bool(weights) == bool(args.model):
        raise ConfigError("give either the weights (a run folder or weights file) or --model NAME")
    if args.model:
        return None, {"model": args.model}, "random weights, seed 0"
    from densenet.models.weights import load_weights

    model, metadata = load_weights(weights)
    return model, metadata, str(weights)


def _random_network(name: str, num_classes: int) -> nn.Module:
    from densenet.models.registry import create_model

    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes)


@torch.no_grad()
def _settle_batchnorm(model: nn.Module, images: Tensor, batch_size: int) -> None:
    """Every BN's running statistics averaged over ``images`` (as after training; random weights otherwise blow
    the activations up layer after layer, and every image ends in the same class)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches
    model.train()
    for batch in images.split(batch_size):
        model(batch)
    model.eval()


def _load_with_train(dataset: str, data_dir: str | None, input_size: int | None):
    """The data set with its training split when there is one (int8 calibration), else the test split only.

    Streamed sets are decoded at ``input_size`` (their evaluation transform); in-memory ones are resized later.
    """
    from densenet.data.datasets import load_data

    try:
        return load_data(dataset, data_dir, train=True, input_size=input_size)
    except DenseNetError:
        return load_data(dataset, data_dir, train=False, input_size=input_size)


def _test_images(data, limit: int | None, mean, std) -> tuple[Tensor, Tensor]:
    """A seeded sample of ``limit`` test images (all if None) as a normalised float tensor, and their labels."""
    from densenet.data.augment import normalize

    test = data.test
    streamed = not hasattr(test, "images")  # imagenet, folder: a Dataset of files, decoded one by one
    total = len(test)
    count = min(limit or (STREAMED_LIMIT if streamed else total), total)
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count].sort().values
    if not streamed:
        return normalize(test.images[pick], mean, std), test.labels[pick]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test, pick.tolist()), batch_size=64)
    images, labels = zip(*loader, strict=True)  # already normalised by the data set's evaluation transform
    return torch.cat(images), torch.cat(labels)


def _resize(images: Tensor, size: int) -> Tensor:
    return torch.cat([nn.functional.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
                      for chunk in images.split(256)])


def _torchvision(model: nn.Module) -> nn.Module | None:
    from densenet.models.compat import torchvision_reference

    try:
        return torchvision_reference(model)
    except ConfigError:
        return None  # not a DenseNet-BC: torchvision has no such network; the speed-ups are against ours
