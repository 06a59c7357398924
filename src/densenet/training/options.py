"""Training options: one typed dataclass, filled from defaults, then a YAML recipe, then command-line flags.

    options = resolve_options(recipe="configs/c10plus-densenet40_k12.yaml", overrides={"epochs": 2})

Defaults depend on the data set (the paper's protocol, kept in each data set's record,
``densenet.data.registry``): CIFAR 300 epochs, SVHN 40, ImageNet 90 with the learning rate divided by 10
at epochs 30 and 60; batch 64 (256 for ImageNet); dropout 0.2 when the data are not augmented (C10, C100,
SVHN). The resolved options are saved as the run folder's config.yaml and inside every checkpoint, so a
resumed run continues with exactly what the interrupted one used.

Each option is written once, here: its type, default, help and choices (a ``Literal``) make both the check
in ``__post_init__`` and the ``densenet train`` flag (``add_flags``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from densenet.data.registry import DATASETS, dataset_record
from densenet.errors import ConfigError
from densenet.models import resnet

# The data sets read from a folder (--data-dir naming a file is a mistake); medmnist and csv take a file.
FOLDER_DATA = ("cifar10", "cifar100", "svhn", "imagenet", "folder")

# Keys a recipe may carry that describe it rather than set an option (and any paper_* key).
RECIPE_INFO = ("description",)



def option(default: Any = None, help: str | None = None, *, metavar: str | None = None, flag: bool = True) -> Any:
    """A TrainOptions field with its flag's help (``flag=False``: set by recipes only)."""
    return field(default=default, metadata=dict(help=help, metavar=metavar, flag=flag))


@dataclass
class TrainOptions:
    dataset: str = option("digits", f"one of {', '.join(DATASETS)} (default digits, built in)")
    model: str | None = option(None, "a model name (densenet list), e.g. densenet40_k12 or densenet_bc100_k12")
    data_dir: str | None = option(None, "where the data set is (default data/<dataset>)")
    download: bool = option(False, "download CIFAR/SVHN when missing (needs internet)")
    epochs: int | None = option(None)
    batch_size: int | None = option(None, "total over all processes (paper: 64 CIFAR/SVHN, 256 ImageNet)")
    lr: float = option(0.1, "initial (step) or peak (onecycle, cosine) learning rate (paper: 0.1)")
    momentum: float = option(0.9, flag=False)
    nesterov: bool = option(True, flag=False)
    weight_decay: float = option(1e-4, "L2 weight decay (paper: 1e-4)")
    milestones: list[int] | None = option(None, "step schedule: epochs where the rate is divided by 10 (default "
                                          "50%% and 75%% of the epochs)", metavar="EPOCH")
    lr_gamma: float = option(0.1, flag=False)
    schedule: Literal["step", "onecycle", "cosine"] = option("step", "step (the paper's, default): the rate divided "
        "by 10 at --milestones; onecycle: linear warm-up to --lr then linear decay to zero, per step; cosine: "
        "warm-up then cosine decay to zero, per step (short runs learn most with onecycle)")  # training/schedule.py
    warmup: float = option(0.25, "onecycle/cosine: fraction of the steps spent warming up (default 0.25)",
                           metavar="FRACTION")
    weight_decay_on: Literal["all", "weights"] = option("all", "all parameters (the paper's, default) or the "
                                                        "conv/linear weights only (not BN scales, biases)")
    label_smoothing: float = option(0.0, "cross-entropy against (1-EPS) one-hot + EPS uniform (default 0)",
                                    metavar="EPS")
    pos_weight: Literal["none", "auto"] = option("none", "binary and multilabel tasks: auto weighs each label's "
                                                 "positives in BCE by negatives / positives in the training "
                                                 "targets (class imbalance); none (default) leaves BCE unweighted")
    tta: Literal["none", "flip", "flip-shift"] = option("none", "test-time augmentation of every evaluation: "
        "flip averages the probabilities (softmax or sigmoid) of each image and its mirror image; flip-shift "
        "also of both moved one pixel down-right and up-left (6 views; default none)")
    drop_rate: float | None = option(None, "dropout after each convolution (paper: 0.2 without augmentation)")
    stem: Literal["cifar", "imagenet", "strided"] | None = option(None, "the network's first layers instead of "
        "the model's own: cifar (3x3 convolution), imagenet (7x7/2 convolution, BN, ReLU, 3x3/2 max-pool) or strided "
        "(3x3 convolution of stride 2: small volumes such as MedMNIST 3D's 28^3 at an eighth of the cifar stem's "
        "cost); DenseNets only")
    augment: Literal["standard", "none"] | None = option(None, "standard: the paper's (pad-crop-flip; ImageNet: "
                                                         "fb.resnet.torch); default by data set")
    crop_padding: int = option(4, "standard augmentation of in-memory sets: zero padding before the random crop "
                               "(the paper's 4; 2 suits short runs better)", metavar="PIXELS")
    flip: Literal["random", "alternate"] = option("random", "standard augmentation of in-memory sets: random "
        "(the paper's, default) flips each image with probability 1/2 in every epoch; alternate flips a random half "
        "of the images in even epochs and the other half in odd ones, so every two epochs show each image both "
        "ways (Jordan 2024)")
    small_crop: int | None = option(None, "progressive resizing: the first --small-crop-epochs epochs train on "
                                    "random SIZE x SIZE crops (same scale, less of each image, fewer FLOPs; "
                                    "in-memory sets, standard augmentation), the rest and every evaluation at full "
                                    "size", metavar="SIZE")
    small_crop_epochs: int = option(0, "how many of the first epochs use --small-crop (default 0)", metavar="N")
    eval_every: int = option(1, "evaluate every N epochs and after the last (default 1; evaluation is a tenth of an "
                             "epoch's time in short CPU runs)", metavar="N")
    input_size: int | None = option(None, "image side for folder/imagenet (default 224) and csv (default 64); "
                                      "a medmnist file keeps its own")
    train_subset: int | None = option(None, "train on a stratified random N of the training images (in-memory "
                                      "sets; for short runs)", metavar="N")
    seed: int = option(0)
    device: Literal["cpu", "cuda", "auto"] = option("auto")
    workers: int = option(4, "DataLoader workers for streamed data sets (default 4)")
    threads: int | None = option(None, "CPU threads (1 is faster on a busy machine: no waiting on a preempted "
                                 "thread)")  # default: the data set's record, else torch's choice (one per core)
    amp: Literal["none", "bf16", "fp16", "auto"] = option("none", "mixed precision: bf16 autocast, fp16 with a "
        "gradient scaler (CUDA), or auto: bf16 where the hardware computes it natively (CUDA; CPUs with AVX-512 "
        "BF16 or AMX), else none (default none: fp32)")
    compile: Literal["auto", "on", "off"] = option("auto", "torch.compile the training step: auto (default) when "
                                                   "the run is long enough to pay for compiling (see "
                                                   "densenet/training/fast.py)")
    channels_last: bool | None = option(None, "NHWC memory layout (default: with compile or CUDA, where it is "
                                        "faster)")  # None: decided by training/fast.py
    memory_efficient: bool = option(False, "shared-storage dense blocks (less memory)")
    init: str | None = option(None, "start from these weights (a new classifier if the classes differ)",
                              metavar="WEIGHTS")
    out: str | None = option(None, "the run folder (default runs/<dataset>-<model>-<time>)", metavar="RUN_DIR")
    quiet: bool = option(False, "no progress bar")
    info: dict[str, Any] = field(default_factory=dict, metadata=dict(flag=False))  # paper_error etc., from the recipe

    def __post_init__(self) -> None:
        record = dataset_record(self.dataset)
        for name in _FLOAT_FIELDS:  # YAML reads 5e-4 (no dot) as a string
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ConfigError(f"--{name.replace('_', '-')} must be a number, not {value!r}") from None
        self.model = self.model or record.model
        self.epochs = record.epochs if self.epochs is None else self.epochs
        self.batch_size = record.batch_size if self.batch_size is None else self.batch_size
        self.augment = self.augment or record.augment
        self.threads = record.threads if self.threads is None else self.threads
        if self.drop_rate is None:  # the paper: dropout 0.2 where there is no augmentation (C10, C100, SVHN)
            self.drop_rate = 0.2 if self.augment == "none" and record.dropout else 0.0
        if self.milestones is None:
            self.milestones = (list(record.milestones) if record.milestones
                               else sorted({int(self.epochs * 0.5), int(self.epochs * 0.75)} - {0}))
        self._validate()

    def _validate(self) -> None:
        _positive("epochs", self.epochs, int)
        _positive("batch-size", self.batch_size, int)
        _positive("lr", self.lr, float)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), not {self.momentum}")
        if not self.weight_decay >= 0 or not math.isfinite(self.weight_decay):
            raise ConfigError(f"--weight-decay must be a finite number >= 0, not {self.weight_decay}")
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
        if self.small_crop is not None:
            _positive("small-crop", self.small_crop, int)
        if isinstance(self.small_crop_epochs, bool) or not isinstance(self.small_crop_epochs, int) \
                or not 0 <= self.small_crop_epochs < self.epochs:
            raise ConfigError(f"--small-crop-epochs must be an integer from 0 to epochs - 1 ({self.epochs - 1}), "
                              f"not {self.small_crop_epochs!r}")
        if self.small_crop_epochs and self.small_crop is None:
            raise ConfigError("--small-crop-epochs needs --small-crop SIZE")
        if self.input_size is not None:
            _positive("input-size", self.input_size, int)
        if self.stem is not None and resnet.is_resnet(self.model):
            raise ConfigError(f"--stem changes a DenseNet's first layers; {self.model} is a comparison ResNet "
                              f"(pytorchcv's, fixed): drop --stem")
        if self.data_dir and self.dataset in FOLDER_DATA and Path(self.data_dir).is_file():
            raise ConfigError(f"--data-dir {self.data_dir} is a file, not a folder: {self.dataset} is read from a "
                              f"folder (unpack an archive first and give its folder)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed and not (getattr(self, name) is None and name in OPTIONAL):
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"not {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup must be a fraction in [0, 1), not {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), not {self.label_smoothing}")
        if any(not isinstance(m, int) or m <= 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing positive epochs, not {self.milestones}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(name: str, value: Any, kind: type) -> None:
    """A positive int, or a positive finite number (nan and inf are not learning rates: they start no training)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0 \
            or not math.isfinite(value):
        raise ConfigError(f"--{name} must be a positive {'number' if kind is float else 'integer'}, not {value!r}")


FIELDS = {f.name for f in dataclasses.fields(TrainOptions)}
_TYPES = typing.get_type_hints(TrainOptions)


def _base(hint: Any) -> Any:
    """int for ``int | None``, Literal[...] for ``Literal[...] | None``: the annotation without None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


# option -> its allowed values, from the Literal annotations
CHOICES = {name: typing.get_args(_base(hint)) for name, hint in _TYPES.items()
           if typing.get_origin(_base(hint)) is Literal}
OPTIONAL = {name for name, hint in _TYPES.items() if type(None) in typing.get_args(hint)}  # None: "the default"
_FLOAT_FIELDS = [name for name, hint in _TYPES.items() if _base(hint) is float]  # YAML may give them as strings
FLAGS = [f.name for f in dataclasses.fields(TrainOptions) if f.metadata.get("flag", True)]


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option (``--batch-size`` for batch_size), its type, choices and help from the field.

    Every flag defaults to None, so that only the flags actually given override a recipe.
    """
    for f in dataclasses.fields(TrainOptions):
        if f.name not in FLAGS:
            continue
        hint, kwargs = _TYPES[f.name], dict(help=f.metadata.get("help"), metavar=f.metadata.get("metavar"))
        base = _base(hint)
        if f.name in CHOICES:
            kwargs.update(choices=list(CHOICES[f.name]))
        elif base is bool:  # bool | None: --x / --no-x; plain bool: --x
            kwargs.update(action=argparse.BooleanOptionalAction if hint is not bool else "store_true")
        elif typing.get_origin(base) is list:
            kwargs.update(type=typing.get_args(base)[0], nargs="+")
        elif base in (int, float):
            kwargs.update(type=base)
        if kwargs.get("action"):
            kwargs.pop("metavar")
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=None, **kwargs)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe as a dict of option values (with ``info`` holding paper_error and friends)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist; the paper's recipes are in configs/") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path} is a folder; give a YAML file (configs/*.yaml)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not a YAML text file (byte {exc.object[exc.start]:#04x} at position "
                          f"{exc.start} is not UTF-8 text); give a recipe like configs/*.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value, not a {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("runtime", None)  # a run folder's config.yaml records the path it ran; a recipe does not set it
    data.pop("task", None)  # nor the task its data had (training/tasks.py): the data decide it
    info = {k: data.pop(k) for k in list(data) if k in RECIPE_INFO or k.startswith("paper_")}
    info.update(data.pop("info", None) or {})
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ConfigError(f"recipe {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    for name, value in data.items():
        check_type(name, value, f"recipe {path}")
    if info:
        data["info"] = info
    return data


_YAML_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a name or path (text)"}
_PLURAL = {int: "integers", float: "numbers", str: "names"}


def check_type(name: str, value: Any, source: str) -> None:
    """``value`` fits option ``name``'s declared type as a flag's value would: a bool is true/false (YAML's own
    booleans, not a string like "no", which Python would take as true), an integer an integer, a number a number,
    a choice one of its ``Literal`` values. A ConfigError names the option and ``source`` (the recipe file)."""
    hint = _TYPES[name]
    if value is None and hint is not _base(hint):  # ``X | None``: None leaves the default
        return
    base = _base(hint)
    if name == "info" or base is Any:
        return
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise ConfigError(f"{source}: {name} must be one of {', '.join(map(str, typing.get_args(base)))}, "
                              f"not {value!r}")
        return
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if not isinstance(value, list) or not all(_fits(v, item) for v in value):
            raise ConfigError(f"{source}: {name} must be a list of {_PLURAL.get(item, item)}, e.g. [150, 225], "
                              f"not {value!r}")
        return
    if typing.get_origin(base) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, not {value!r}")
        return
    if not _fits(value, base):
        raise ConfigError(f"{source}: {name} must be {_YAML_NAMES.get(base, base)}, not {value!r}"
                          + (" (a quoted string)" if isinstance(value, str) and base is not str else ""))
    if base is float and not math.isfinite(float(value)):  # .nan, .inf: no option means anything by them
        raise ConfigError(f"{source}: {name} must be a finite number, not {value!r}")


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never to a recipe
        return False
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string: a number written as one is a number
            try:
                float(value)
            except ValueError:
                return False
            return True  # "nan" too: the option's own check then says why it cannot be
        return isinstance(value, (int, float))
    return isinstance(value, kind)


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


# What a resumed run may be given anew without becoming another run: where and how it runs, and, with the paper's
# step schedule, more epochs (a per-step schedule's length is its shape: --epochs would change the run).
RESUME_FREE = ("epochs", "quiet", "workers", "threads", "data_dir", "download", "device", "compile", "channels_last",
               "memory_efficient", "eval_every")


def resume_changes(saved: dict[str, Any], given: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The options ``given`` again to ``--resume`` (flags and recipe values) sorted into three lists: the same as
    the run's (``saved``, its checkpoint's), free to change (``RESUME_FREE``), and changing the run."""
    same, free, changing = [], [], []
    for name, value in given.items():
        if name == "info":
            continue
        if name in saved and saved[name] == value:
            same.append(name)
        elif name in RESUME_FREE and not (name == "epochs" and saved.get("schedule", "step") != "step"):
            free.append(name)
        else:
            changing.append(name)
    return same, free, changing


def flag_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"
