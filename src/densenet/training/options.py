"""Training options: one typed dataclass, filled from defaults, then a YAML recipe, then command-line flags.

    options = resolve_options(recipe="configs/cifar10_densenet40_k12_aug.yaml", overrides={"epochs": 2})

Defaults depend on the data set (the paper's protocol): CIFAR 300 epochs, SVHN 40, ImageNet 90 with the
learning rate divided by 10 at epochs 30 and 60; batch 64 (256 for ImageNet); dropout 0.2 when the data
are not augmented (C10, C100, SVHN). The resolved options are saved as the run folder's config.yaml and
inside every checkpoint, so a resumed run continues with exactly what the interrupted one used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from densenet.data.datasets import DATASETS, check_dataset
from densenet.errors import ConfigError

# data set -> (model, epochs, batch size, milestones (None: 50% and 75% of the epochs))
DATASET_DEFAULTS: dict[str, tuple[str, int, int, list[int] | None]] = {
    "digits": ("densenet_bc40_k12", 20, 64, None),
    "cifar10": ("densenet_bc100_k12", 300, 64, None),
    "cifar100": ("densenet_bc100_k12", 300, 64, None),
    "svhn": ("densenet_bc100_k12", 40, 64, None),
    "imagenet": ("densenet121", 90, 256, [30, 60]),
    "folder": ("densenet121", 90, 64, None),
}
# Keys a recipe may carry that describe it rather than set an option (and any paper_* key).
RECIPE_INFO = ("description",)


_FLOAT_FIELDS = ("lr", "momentum", "weight_decay", "lr_gamma", "warmup", "label_smoothing", "drop_rate")


@dataclass
class TrainOptions:
    dataset: str = "digits"
    model: str | None = None
    data_dir: str | None = None
    download: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: list[int] | None = None
    lr_gamma: float = 0.1
    schedule: Literal["step", "onecycle", "cosine"] = "step"  # step: the paper's; see training/schedule.py
    warmup: float = 0.25  # onecycle/cosine: the fraction of all steps spent warming up
    weight_decay_on: Literal["all", "weights"] = "all"  # weights: conv/linear weights only, not BN or biases
    label_smoothing: float = 0.0
    tta: Literal["none", "flip"] = "none"  # test-time augmentation of every evaluation: flip = image + mirror
    drop_rate: float | None = None
    augment: Literal["standard", "none"] | None = None
    crop_padding: int = 4  # standard augmentation: zero padding before the random crop (the paper's 4 pixels)
    eval_every: int = 1  # evaluate every N epochs and after the last one (evaluation costs time in short runs)
    input_size: int | None = None
    train_subset: int | None = None  # a stratified random subset of the training images, for short runs
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    workers: int = 4
    threads: int | None = None  # CPU threads for torch (default: torch's choice, one per core)
    amp: Literal["none", "bf16", "fp16", "auto"] = "none"  # auto: bf16 where the hardware has it natively
    compile: Literal["auto", "on", "off"] = "auto"  # auto: when the run is long enough to pay for compiling
    channels_last: bool | None = None  # None: where it is faster (with compile); see training/fast.py
    memory_efficient: bool = False
    init: str | None = None
    out: str | None = None
    quiet: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # paper_error etc., copied from the recipe

    def __post_init__(self) -> None:
        check_dataset(self.dataset)
        for name in _FLOAT_FIELDS:  # YAML reads 5e-4 (no dot) as a string
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ConfigError(f"--{name.replace('_', '-')} must be a number, not {value!r}") from None
        model, epochs, batch_size, milestones = DATASET_DEFAULTS[self.dataset]
        self.model = self.model or model
        self.epochs = epochs if self.epochs is None else self.epochs
        self.batch_size = batch_size if self.batch_size is None else self.batch_size
        self.augment = self.augment or DATASETS[self.dataset][0]
        if self.threads is None and self.dataset == "digits":
            # 8x8 images: the ops are too small for a second thread to pay, and on a busy machine two threads
            # wait on each other at every op (measured here: 313 images/s with one, 12 with two).
            self.threads = 1
        if self.drop_rate is None:  # the paper: dropout 0.2 where there is no augmentation (C10, C100, SVHN)
            self.drop_rate = 0.2 if self.augment == "none" and self.dataset in ("cifar10", "cifar100", "svhn") else 0.0
        if self.milestones is None:
            self.milestones = milestones or sorted({int(self.epochs * 0.5), int(self.epochs * 0.75)} - {0})
        self._validate()

    def _validate(self) -> None:
        _positive("epochs", self.epochs, int)
        _positive("batch-size", self.batch_size, int)
        _positive("lr", self.lr, float)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, not {self.weight_decay}")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"lr_gamma must be in (0, 1], not {self.lr_gamma}")
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"--drop-rate must be in [0, 1), not {self.drop_rate}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, not {self.workers}")
        if self.train_subset is not None:
            _positive("train-subset", self.train_subset, int)
        if self.threads is not None:
            _positive("threads", self.threads, int)
        _positive("eval-every", self.eval_every, int)
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ConfigError(f"--crop-padding must be an integer >= 0, not {self.crop_padding!r}")
        if self.input_size is not None:
            _positive("input-size", self.input_size, int)
        for name, value, allowed in (("augment", self.augment, ("standard", "none")),
                                     ("device", self.device, ("cpu", "cuda", "auto")),
                                     ("amp", self.amp, ("none", "bf16", "fp16", "auto")),
                                     ("schedule", self.schedule, ("step", "onecycle", "cosine")),
                                     ("weight-decay-on", self.weight_decay_on, ("all", "weights")),
                                     ("tta", self.tta, ("none", "flip")),
                                     ("compile", self.compile, ("auto", "on", "off"))):
            if value not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup must be a fraction in [0, 1), not {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), not {self.label_smoothing}")
        if any(not isinstance(m, int) or m <= 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing positive epochs, not {self.milestones}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(name: str, value: Any, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise ConfigError(f"--{name} must be a positive {'number' if kind is float else 'integer'}, not {value!r}")


FIELDS = {f.name for f in dataclasses.fields(TrainOptions)}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe as a dict of option values (with ``info`` holding paper_error and friends)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist; the paper's recipes are in configs/") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("runtime", None)  # a run folder's config.yaml records the path it ran; a recipe does not set it
    info = {k: data.pop(k) for k in list(data) if k in RECIPE_INFO or k.startswith("paper_")}
    info.update(data.pop("info", None) or {})
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ConfigError(f"recipe {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    if info:
        data["info"] = info
    return data


def resolve_options(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    base: dict[str, Any] | None = None) -> TrainOptions:
    """Defaults, then ``base`` (a resumed run's config), then the recipe, then the flags that were given."""
    values: dict[str, Any] = dict(base or {})
    if recipe:
        values.update(read_recipe(recipe))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    try:
        return TrainOptions(**values)
    except TypeError as exc:
        raise ConfigError(f"bad option value: {exc}") from exc
