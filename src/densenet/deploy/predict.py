"""``densenet predict WEIGHTS_OR_RUN_DIR IMAGE_OR_FOLDER...``: the top-k classes of image files or volumes.

    densenet predict runs/digits my_digit.png             # top 5 classes with probabilities
    densenet predict model.safetensors photos/ --top-k 1 --json
    densenet predict densenet121 photo.jpg                # torchvision's ImageNet weights, cached by torch.hub
    densenet predict runs/adrenal case1.npy scans/        # a 3D model: .npy volumes (a folder: its *.npy)

Everything comes from the weights file's metadata: the class names, the input size, the channels
(a grayscale model gets grayscale images), the normalisation, and the evaluation preprocessing of the
data set it was trained on:

- small in-memory sets (digits, CIFAR, SVHN): the image is resized to input_size x input_size (bicubic,
  as ``densenet.data.folders.decode_all`` does) — plain resizing, no crop;
- ImageNet and image folders: short side resized to input_size * 256/224, centre crop (``eval_transform``).

Any common image file works (grayscale, RGBA, palette, CMYK, 16-bit are converted by ``load_image``). A broken
file does not cost the others their results: it is yielded as a ``Prediction`` with its ``error`` and no classes.
Weights without metadata are predicted with the assumptions ``assumptions`` states (no normalisation, class
indices as names), which ``densenet predict`` says once.

**Volumes.** A model trained on volumes (``spatial_dims`` 3 in the weights' config: MedMNIST 3D, a CSV of .npy
volumes) takes ``.npy`` files, read by the training loader's own reader (``densenet.data.labelled.read_volume``):
(D, H, W) or (1, D, H, W), uint8 0..255 or floating point 0..1 (stored as round(255 v)), resized trilinearly to
an input_size cube when not one (as evaluation loads a CSV set: ``input_size`` from the metadata; weights without
it keep each volume's shape), then / 255, minus the metadata's mean, over its std (``augment.normalize``), as one
channel: (1, D, H, W). A 2D model refuses .npy files and a 3D model image files, and a volume of another shape
or value range is refused, each as a broken image is (one line naming the file and what is expected). A folder
is searched for image files for a 2D model, for ``*.npy`` for a 3D one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from densenet.data.augment import normalize
from densenet.data.images import IMAGE_EXTENSIONS, load_image
from densenet.data.labelled import VOLUME_FORMS, read_volume
from densenet.data.registry import DATASETS
from densenet.errors import DenseNetError
from densenet.files import printable


@dataclass(frozen=True)
class Preprocess:
    """An image file -> the (C, H, W) float tensor the model was evaluated on; for a 3D model, a .npy volume ->
    (1, D, H, W)."""

    input_size: int | None  # None only for a 3D model whose weights do not say: volumes keep their shape
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grayscale: bool
    centre_crop: bool  # ImageNet style (resize 256/224, centre crop) rather than a plain resize
    spatial_dims: int = 2  # 3: .npy volumes

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Preprocess:
        config = metadata["config"]
        channels = int(config.get("in_chans", 3))
        spatial_dims = int(config.get("spatial_dims", 2))
        if spatial_dims not in (2, 3):
            raise DenseNetError(f"this model takes {spatial_dims}D inputs; predict reads 2D images and 3D volumes")
        if spatial_dims == 3 and channels != 1:
            raise DenseNetError(f"this 3D model takes {channels}-channel volumes; .npy volumes are read as one "
                                f"channel ({VOLUME_FORMS}), as training reads them")
        size = int(metadata.get("input_size") or (224 if config.get("stem") == "imagenet" else 32))
        mean = list(metadata.get("mean") or [0.0] * channels)
        std = list(metadata.get("std") or [1.0] * channels)
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels or len(std) != channels:
            raise DenseNetError(f"the weights' metadata has {len(mean)} mean values for a {channels}-channel model")
        dataset = str(metadata.get("dataset") or "")
        record = DATASETS.get(dataset)  # how that data set's evaluation preprocesses; unknown: as image folders
        crop = record.preprocess == "crop" if record else (dataset != "" or config.get("stem") == "imagenet")
        if spatial_dims == 3:
            size = int(metadata["input_size"]) if metadata.get("input_size") else None
            crop = False
        return cls(size, tuple(map(float, mean)), tuple(map(float, std)), channels == 1, crop, spatial_dims)

    def __call__(self, path: str | Path) -> Tensor:
        if self.spatial_dims == 3:
            return self.volume(path)
        if Path(path).suffix.lower() == ".npy":
            raise DenseNetError(f"cannot read image {printable(path)}: a .npy array, and this model takes 2D images "
                                f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...); .npy volumes are for models trained "
                                f"on volumes (spatial_dims 3)")
        image = load_image(path, mode="L" if self.grayscale else "RGB")
        if self.centre_crop:
            from densenet.data.folders import eval_transform

            return eval_transform(self.input_size, list(self.mean), list(self.std))(image)
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size), resample=3)  # bicubic, as decode_all
        array = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, C), a writable copy
        pixels = torch.from_numpy(array[None] if self.grayscale else np.ascontiguousarray(array.transpose(2, 0, 1)))
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def volume(self, path: str | Path) -> Tensor:
        """A .npy volume -> (1, D, H, W), as evaluation loads and normalises the training set's volumes."""
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            raise DenseNetError(f"cannot read volume {printable(path)}: an image file, and this model takes 3D "
                                f"volumes as .npy files ({VOLUME_FORMS})")
        volume = read_volume(path, self.input_size)  # (D, H, W) uint8, an input_size cube; errors name the file
        return normalize(torch.from_numpy(volume)[None, None], self.mean, self.std)[0]


@dataclass
class Prediction:
    image: str  # the file name, printable whatever its encoding (``files.printable``)
    classes: list[tuple[int, str, float]]  # (index, name, probability), most probable first
    error: str | None = None  # why the image could not be read (then ``classes`` is empty)
    # binary and multilabel (``task`` in the metadata): ``classes`` holds every label's sigmoid probability;
    # ``labels`` the names above their ``thresholds`` (per label); ``decided`` a binary model's class
    task: str = "multiclass"
    thresholds: dict[str, float] | None = None
    labels: list[str] | None = None
    decided: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        if self.task != "multiclass":
            out = {"image": self.image, "task": self.task,
                   "probabilities": {name: p for _, name, p in self.classes},
                   "thresholds": self.thresholds, "labels": self.labels}
            return out | ({"class": self.decided} if self.task == "binary" else {})
        return {"image": self.image,
                "predictions": [{"index": i, "class": name, "probability": p} for i, name, p in self.classes]}


SAID = ("classes", "mean", "std", "input_size")  # what weights should say for prediction to need no guess


def assumptions(metadata: dict[str, Any]) -> str | None:
    """What prediction assumes for what the weights' metadata does not say (class names, mean and std), in words;
    None when it says everything."""
    missing = [key for key in SAID if not metadata.get(key)]
    if not missing:
        return None
    preprocess = Preprocess.from_metadata(metadata)
    side = preprocess.input_size
    words = []
    if "mean" in missing or "std" in missing:
        words.append(f"no normalisation (pixels / 255, mean {list(preprocess.mean)}, std {list(preprocess.std)})")
    if "input_size" in missing and preprocess.spatial_dims == 3:
        words.append("each volume at its own size")
    elif "input_size" in missing:
        words.append(f"{'a centre crop' if preprocess.centre_crop else 'a plain resize'} to {side}x{side}")
    if "classes" in missing:
        words.append("class indices as names")
    return ", ".join(words)


def check_inputs(inputs: Sequence[str | Path]) -> None:
    """Every file or folder given exists (checked before a model is loaded to learn what its folders hold)."""
    for item in map(Path, inputs):
        if not item.exists():
            raise DenseNetError(f"cannot read image {printable(item)}: no such file or folder")


def find_images(inputs: Sequence[str | Path], volumes: bool = False) -> list[Path]:
    """The files given, and the image files (by extension) anywhere under the folders given, in order;
    ``volumes`` (a 3D model): the .npy files under the folders instead."""
    check_inputs(inputs)
    extensions, kind = ((".npy",), ".npy volumes") if volumes else \
        (IMAGE_EXTENSIONS, f"image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                raise DenseNetError(f"folder {printable(item)} holds no {kind}")
            found += files
        else:
            found.append(item)  # named explicitly: tried whatever its extension (the reader says if it is no image)
    return found


def same_shape(path: str | Path, tensor: Tensor, shape: tuple[int, ...] | None,
               hint: str = "give --input-size N to resize them all to N^3") -> tuple[int, ...]:
    """The shape inputs must share (``shape``, or this first tensor's): volumes kept at their own size (weights
    without an input size) batch only when they agree; another is one line naming the file, and ``hint``."""
    own = tuple(tensor.shape[1:])
    if shape is not None and own != shape:
        raise DenseNetError(f"cannot read volume {printable(path)}: it is {own}, the first {shape}; {hint}")
    return own


def takes_volumes(metadata: dict[str, Any]) -> bool:
    """Whether the weights are a 3D model's, which reads .npy volumes (``spatial_dims`` 3 in their config)."""
    return int(metadata.get("config", {}).get("spatial_dims", 2)) == 3


def predict(model: torch.nn.Module, metadata: dict[str, Any], images: Sequence[str | Path], top_k: int = 5,
            device: str | torch.device = "cpu", batch_size: int = 32, engine: str = "auto",
            say: Callable[[str], None] | None = None, threshold: float | None = None) -> Iterator[Prediction]:
    """Top-k predictions for each image file, in order, a batch at a time, through an inference ``engine``.

    Weights of a binary or multilabel task (the metadata's ``task``) give every label's sigmoid probability and
    the labels above a threshold: ``threshold`` when given, else the per-label ones training chose on validation
    data (the metadata's ``thresholds``), else 0.5; a binary model's ``decided`` class follows the same rule.

    The engine (``densenet.inference.engines``; ``auto``: the fastest that keeps eager's accuracy on this
    hardware, checked against eager on the first batch) is built on the first batch; ``say`` is told which one
    runs, and why when it is not the first choice.
    """
    from densenet.inference.engines import build_engine

    preprocess = Preprocess.from_metadata(metadata)
    num_classes = int(metadata["config"]["num_classes"])
    if num_classes <= 0:
        raise DenseNetError("this model has no classifier (num_classes 0): nothing to predict")
    task = _task(metadata, num_classes)
    classes = list(metadata.get("classes") or [str(i) for i in range(num_classes)])
    if task is None and len(classes) != num_classes:
        raise DenseNetError(f"the weights' metadata names {len(classes)} classes for a {num_classes}-class model")
    k = min(top_k, num_classes)
    cutoffs = _thresholds(task, metadata, threshold)
    model = model.to(device).eval()
    forward = None
    shape = None  # the first input's: volumes kept at their own size (no input_size) must share it to batch
    for start in range(0, len(images), batch_size):
        paths, tensors = [], []
        for path in images[start:start + batch_size]:
            try:
                tensor = preprocess(path)
                shape = same_shape(path, tensor, shape)
                tensors.append(tensor)
                paths.append(path)
            except DenseNetError as exc:  # the others keep their results; the caller lists the unreadable ones
                yield Prediction(printable(path), [], error=str(exc))
        if not paths:
            continue
        batch = torch.stack(tensors).to(device)
        if forward is None:  # built on real images, once the first batch has decoded
            # int8 is calibrated on the first batch of your images: there are no training images here
            calibration = batch if engine.endswith("-int8") else None
            forward = build_engine(model, engine, example=batch, device=device, calibration=calibration,
                                   sigmoid=task is not None and task.sigmoid)
            if say:
                say(forward.describe() + (f"; {forward.note}" if forward.note else ""))
        if task is not None and task.sigmoid:
            yield from _sigmoid_predictions(task, paths, forward(batch).float().sigmoid().cpu(), cutoffs)
            continue
        probabilities = torch.softmax(forward(batch).float(), dim=1).cpu()
        values, indices = probabilities.topk(k, dim=1)
        for path, vals, idxs in zip(paths, values.tolist(), indices.tolist(), strict=True):
            yield Prediction(printable(path), [(i, classes[i], v) for i, v in zip(idxs, vals, strict=True)])


def _task(metadata: dict[str, Any], outputs: int):
    """The weights' task (``densenet.data.task.Task``) when the metadata record one, else None (multiclass)."""
    if not isinstance(metadata.get("task"), dict):
        return None
    from densenet.data.task import Task

    task = Task.from_dict(metadata["task"])
    if task.num_outputs != outputs:
        raise DenseNetError(f"the weights' metadata records a {task.kind} task with {task.num_outputs} outputs for "
                            f"a model with {outputs}")
    return task


def _thresholds(task, metadata: dict[str, Any], threshold: float | None) -> list[float]:
    """Per output: ``threshold``, else the metadata's (chosen on validation data), else 0.5."""
    if task is None or not task.sigmoid:
        return []
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise DenseNetError(f"--threshold is a probability in [0, 1], not {threshold}")
        return [float(threshold)] * task.num_outputs
    recorded = metadata.get("thresholds")
    if isinstance(recorded, list) and len(recorded) == task.num_outputs:
        return [float(t) for t in recorded]
    return [0.5] * task.num_outputs


def _sigmoid_predictions(task, paths: Sequence[str | Path], probabilities: Tensor,
                         cutoffs: list[float]) -> Iterator[Prediction]:
    names = list(task.label_names)
    for path, row in zip(paths, probabilities.tolist(), strict=True):
        ranked = sorted(((j, names[j], p) for j, p in enumerate(row)), key=lambda item: -item[2])
        above = [names[j] for j, p in enumerate(row) if p > cutoffs[j]]
        decided = (task.names[1] if above else task.names[0]) if task.kind == "binary" else None
        yield Prediction(printable(path), ranked, task=task.kind, thresholds=dict(zip(names, cutoffs, strict=True)),
                         labels=above, decided=decided)
