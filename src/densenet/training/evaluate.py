"""``densenet evaluate``: top-1 and top-5 error of trained weights on a data set's test split.

    densenet evaluate runs/digits-densenet_bc40_k12-20260101-120000
    densenet evaluate model.safetensors --dataset imagenet --data-dir /imagenet --ten-crop --json
    densenet evaluate densenet121 --dataset imagenet --data-dir /imagenet     # torchvision's ImageNet weights

The data set, class names and normalisation come from the weights' metadata unless given; ImageNet and
folders are evaluated on a single centre crop (resize 256, crop 224) or, with --ten-crop, on the four
corners, centre and their mirror images, averaging the ten softmax outputs. The network runs through the
fastest inference engine that keeps eager's accuracy here (``--engine auto``: OpenVINO bf16 on a CPU with
native bf16, else fp32; checked against eager on the first test images; see ``densenet.inference.engines``;
it is named in the output), or the one ``--engine`` names; ``--engine eager`` is plain PyTorch and gives
exactly the error ``densenet train`` reported. ``--amp bf16`` and a GPU run eager PyTorch under ``auto``.

Binary and multilabel weights (their metadata's ``task``) are measured by ``densenet.data.metrics``: AUROC per
label and averaged, mAP, ACC at 0.5 (MedMNIST's), Hamming loss, F1 (``metrics`` in the result); a CSV-labelled
set is loaded with the weights' label names and, for a run folder, its split.csv and seed, so the test split is
the one the run held out.

Test-time augmentation is the run's own unless ``tta`` is given: the weights' metadata records it (``tta``), and
for weights saved before it did, the ``config.yaml`` of the run folder they are in; so evaluating a run folder
reproduces the error its training reported, to the image, with ``--engine eager``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from densenet.data.augment import TTA_VIEWS
from densenet.data.datasets import load_data
from densenet.data.registry import DATASETS
from densenet.data.task import Task
from densenet.devices import resolve_device
from densenet.errors import DenseNetError
from densenet.training.distributed import Dist
from densenet.training.engine import Batches, evaluate


def evaluate_weights(checkpoint: str, dataset: str | None = None, data_dir: str | None = None, *,
                     batch_size: int = 128, workers: int = 4, device: str = "auto", ten_crop: bool = False,
                     tta: str | None = None, amp: str = "none", engine: str = "auto",
                     metadata: dict | None = None, threshold: float | None = None) -> dict:
    """Top-1/top-5 error, loss and count of the weights on the test split, and the inference engine that ran.

    ``metadata`` (mean, std, classes, dataset...) is attached to weights that lack it, over what they carry; what
    was assumed for lack of it is returned as ``assumed`` (None when the weights said everything needed).

    ``tta=None`` applies the run's recorded test-time augmentation (``run_tta``); the result says which ran and
    where it came from (``tta``, ``tta_source``).

    Binary and multilabel weights: ``metrics`` holds every measure of ``densenet.data.metrics.compute_metrics``
    at ``threshold`` (default 0.5, as training reports them), ``task`` and ``labels`` say what was measured;
    ``top1_error``/``top5_error`` are then None (``metrics["error"]`` is the error at the threshold)."""
    from densenet.inference.engines import build_engine
    from densenet.models.weights import load_weights

    if batch_size <= 0:
        raise DenseNetError(f"--batch-size must be a positive integer, not {batch_size}")
    dev = resolve_device(device)
    model, meta = load_weights(checkpoint)
    meta = {**meta, **(metadata or {})}
    tta_source = "given"
    if tta is None:  # ten crops are views of their own: they replace the run's, as ImageNet's protocol has it
        tta, tta_source = ("none", "ten-crop") if ten_crop else run_tta(checkpoint, meta)
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise DenseNetError(f"{checkpoint} does not say which data set it was trained on; pass --dataset")
    if ten_crop and dataset in DATASETS and DATASETS[dataset].in_memory:
        raise DenseNetError(f"--ten-crop is for imagenet and folder data sets, not {dataset} (32x32 images)")
    task = Task.from_dict(meta["task"]) if isinstance(meta.get("task"), dict) else None
    run = _run_config(checkpoint)
    extra = {}
    if dataset in ("csv", "medmnist") and run.get("dataset") == dataset:
        data_dir = data_dir or run.get("data_dir")  # the run's own file
    if dataset == "csv":  # the run's label names, and the split it drew (its split.csv and seed)
        from densenet.training.tasks import split_file

        extra = {"seed": int(run.get("seed", 0)), "split_file": split_file(checkpoint) if Path(checkpoint).exists()
                 else None, "names": list(task.names) if task is not None else None}
    data = load_data(dataset, data_dir, train=False, ten_crop=ten_crop, input_size=meta.get("input_size"), **extra)
    task = task or data.task  # weights from before tasks were recorded: multiclass, as the data say
    if task.kind != data.task.kind:
        raise DenseNetError(f"{checkpoint} was trained for a {task.kind} task but {dataset} here is {data.task.kind}"
                            f" ({', '.join(data.task.names)})")
    classes = meta.get("classes")
    if classes and len(classes) != data.num_classes:
        raise DenseNetError(f"{checkpoint} predicts {len(classes)} classes but {dataset} has {data.num_classes}")
    if int(model.config.get("in_chans", 3)) != data.in_chans:
        raise DenseNetError(f"{checkpoint} takes {model.config.get('in_chans', 3)}-channel images but {dataset} has "
                            f"{data.in_chans}-channel images")
    if model.config.get("num_classes") != task.num_outputs:
        raise DenseNetError(f"{checkpoint} has {model.config.get('num_classes')} outputs but {dataset} has "
                            f"{data.num_classes} {'labels' if task.kind == 'multilabel' else 'classes'}"
                            + (" (one output: the positive class's)" if task.kind == "binary" else ""))
    assumed = None
    if meta.get("mean") and data.in_memory:  # normalise as in training
        data = dataclasses.replace(data, mean=list(meta["mean"]), std=list(meta["std"]))
    elif data.in_memory:  # weights without metadata: the data set's own statistics, which training would have used
        assumed = (f"normalised with {dataset}'s mean {_short(data.mean)} and std {_short(data.std)} as loaded "
                   f"here" + ("" if meta.get("classes") else f", and {dataset}'s class names"))
    if amp != "none" and engine not in ("auto", "eager", "compile"):
        raise DenseNetError(f"--amp {amp} is autocast, which only eager PyTorch and compile apply; "
                            f"drop --engine {engine} or --amp")
    batches = Batches(data, data.test, batch_size, Dist(), dev, train=False, workers=workers)
    example = _first_test_images(data, batch_size).to(dev)
    model = model.to(dev).eval()
    calibration = _calibration(dataset, data_dir, meta) if engine.endswith("-int8") else None
    forward = build_engine(model, "eager" if amp != "none" and engine == "auto" else engine, example, dev,
                           calibration=calibration, sigmoid=task.sigmoid)
    stats = evaluate(model, batches, dev, Dist(), amp, forward=forward, tta=tta, task=task,
                     threshold=0.5 if threshold is None else threshold)
    # Non-finite outputs (diverged weights) make the loss NaN and the error rates meaningless: null, not NaN.
    diverged = not math.isfinite(stats.loss)
    multiclass = task.kind == "multiclass"
    per_task = {} if multiclass else {
        "labels": list(task.label_names), "threshold": 0.5 if threshold is None else threshold,
        "metrics": None if diverged else {k: None if not math.isfinite(v) else round(v, 6)
                                          for k, v in stats.metrics.items()}}
    return {"model": meta.get("model"), "dataset": dataset, "task": task.kind, **per_task,
            "top1_error": None if diverged or not multiclass else round(stats.error, 4),
            "top5_error": None if diverged or not multiclass else round(stats.top5_error, 4), "n": stats.n,
            "loss": None if diverged else round(stats.loss, 6), "ten_crop": ten_crop, "tta": tta,
            "tta_source": tta_source, "amp": amp,
            "diverged": diverged, "engine": forward.name, "engine_build_seconds": round(forward.build_seconds, 3),
            "engine_note": forward.note, "assumed": assumed}


def run_tta(weights: str, metadata: dict) -> tuple[str, str]:
    """The test-time augmentation the run evaluated with, and where that was read: the weights' metadata, else
    the ``config.yaml`` of the run folder the weights are (or are in), else none."""
    if metadata.get("tta"):
        return str(metadata["tta"]), "the weights' metadata"
    path = Path(weights)
    config = (path if path.is_dir() else path.parent) / "config.yaml"
    if path.exists() and config.is_file():
        import yaml

        try:
            recorded = (yaml.safe_load(config.read_text()) or {}).get("tta")
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded in TTA_VIEWS:
            return recorded, str(config)
    return "none", "default"


def _run_config(weights: str) -> dict:
    """The config.yaml of the run folder the weights are (or are in): its seed and data; {} when there is none."""
    path = Path(weights)
    config = (path if path.is_dir() else path.parent) / "config.yaml"
    if not (path.exists() and config.is_file()):
        return {}
    import yaml

    try:
        value = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def _first_test_images(data, count: int) -> torch.Tensor:
    """The first ``count`` test images as the evaluation feeds them: the batch the engine is built for, and the
    images ``--engine auto`` checks its engine against eager on (zeros would agree with anything)."""
    from densenet.data.augment import normalize

    count = min(count, len(data.test))
    if hasattr(data.test, "images"):  # in memory: uint8, normalised as in training
        return normalize(data.test.images[:count], data.mean, data.std)
    images = torch.stack([data.test[i][0] for i in range(count)])
    return images.flatten(0, 1)[:count] if images.dim() == 5 else images  # ten crops: evaluate feeds one at a time


def _calibration(dataset: str, data_dir: str | None, meta: dict, count: int = 512) -> torch.Tensor:
    """``count`` seeded training images, normalised as for evaluation: what an int8 engine is calibrated on."""
    try:
        data = load_data(dataset, data_dir, train=True, input_size=meta.get("input_size"))
    except DenseNetError as exc:
        raise DenseNetError(f"an int8 engine is calibrated on training images, and there are none: {exc}") from exc
    from densenet.inference.engines import calibration_images

    return calibration_images(data.train, count, meta.get("mean") or data.mean, meta.get("std") or data.std)


def _short(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"
