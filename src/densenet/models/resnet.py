"""The comparison networks of the paper's Figure 4: the CIFAR ResNets of He et al. (2016a) and the pre-activation
ResNets of He et al. (2016b), built from the maintained ``pytorchcv`` model zoo rather than written here.

    create_model("resnet56_cifar")          # 855,770 parameters at 10 classes (He et al.: 0.85M)
    densenet train --config configs/figure4/resnet56_cifar.yaml --data-dir data/cifar10

Names: ``resnet{20,32,44,56,110}_cifar`` (basic blocks, depth 6n+2) and ``preresnet{164,1001}_cifar``
(pre-activation bottleneck blocks, depth 9n+2; the 1001-layer one is the paper's Figure 4 reference, 10.2M).
Beyond these, any depth builds by He et al.'s rule: basic blocks (6n+2 layers) below 164 layers, bottleneck
blocks (9n+2) from 164 on, e.g. ``resnet8_cifar``, ``preresnet110_cifar``, ``resnet164_cifar``. Widths are
He et al.'s: 16, 32 and 64 channels per stage (x4 after a bottleneck), a 3x3 16-channel stem, global average
pooling, one linear layer. pytorchcv's shortcut across a change of shape is a 1x1 convolution with batch norm
(He et al.'s option B); their CIFAR table used zero-padded identities (option A), which have no parameters. So the basic
ResNets here have 2,752 parameters more than the published ones (ResNet-20: 272,474 against 269,722, both
0.27M; ResNet-32: 466,906, 0.47M, against 0.46M); without the two projections the counts are He et al.'s.
The pre-activation ResNets count 1.70M (164 layers) and 10.33M (1001; the papers print 10.2M).

Two changes to pytorchcv's network, both for the library's training path:

- its 8x8 average pooling becomes global (``AdaptiveAvgPool2d``): identical on 32x32 images, and it lets the
  progressive-resizing recipes (``--small-crop 24``: 6x6 final maps) train ResNets as they train DenseNets;
- the model carries ``config`` (its constructor arguments, as a DenseNet does), which the training code writes
  into checkpoints and weight files.

This module imports no torch at import time (the registry reads its names without loading torch); pytorchcv
is an optional dependency (``pip install densenet-paper[compare]``), imported when a ResNet is built.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from densenet.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

INSTALL_HINT = "the comparison ResNets need pytorchcv: pip install densenet-paper[compare]"
_PATTERN = re.compile(r"^(?P<pre>pre)?resnet(?P<depth>\d+)_cifar$")


def resnet_config(depth: int, preact: bool = False, bottleneck: bool | None = None) -> dict[str, Any]:
    """The constructor arguments of a CIFAR ResNet of ``depth`` layers; bottleneck by default from 164 layers on
    (He et al.'s choice: ResNet-110 is the deepest basic one, 164 and 1001 are bottleneck)."""
    bottleneck = depth >= 164 if bottleneck is None else bottleneck
    per_unit = 9 if bottleneck else 6  # convolutions per residual unit x 3 stages
    if depth < 2 + per_unit or (depth - 2) % per_unit:
        kind = "bottleneck" if bottleneck else "basic-block"
        raise ConfigError(f"depth {depth} is not {per_unit}n+2 for a {kind} CIFAR ResNet")
    return dict(arch="preresnet" if preact else "resnet", depth=depth, bottleneck=bottleneck, in_chans=3,
                num_classes=10, stem="cifar")


# name -> constructor arguments; params at 10 classes as He et al. publish them (tests/models/test_resnet.py)
RESNETS: dict[str, dict[str, Any]] = {
    **{f"resnet{d}_cifar": resnet_config(d) for d in (20, 32, 44, 56, 110)},
    **{f"preresnet{d}_cifar": resnet_config(d, preact=True) for d in (164, 1001)},
}


def is_resnet(name: str) -> bool:
    """Whether ``name`` is one of this module's networks (a named one, or any valid depth)."""
    return name in RESNETS or bool(_PATTERN.match(name))


def is_resnet_config(config: dict[str, Any]) -> bool:
    """Whether a weights file's or checkpoint's ``config`` describes a ResNet of this module (not a DenseNet)."""
    return config.get("arch") in ("resnet", "preresnet")


def model_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a named ResNet."""
    if name in RESNETS:
        return dict(RESNETS[name])
    match = _PATTERN.match(name)
    if not match:
        raise ConfigError(f"unknown ResNet {name!r}; choose from {', '.join(RESNETS)}")
    return resnet_config(int(match["depth"]), preact=bool(match["pre"]))


def build_resnet(config: dict[str, Any]) -> nn.Module:
    """pytorchcv's CIFAR (pre-activation) ResNet for ``config``, with global pooling and ``.config``."""
    try:
        from pytorchcv.models.preresnet_cifar import CIFARPreResNet
        from pytorchcv.models.resnet_cifar import CIFARResNet
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    from torch import nn

    config = dict(config)
    depth, bottleneck = int(config["depth"]), bool(config["bottleneck"])
    per_stage = (depth - 2) // (9 if bottleneck else 6)
    widths = [[w * (4 if bottleneck else 1)] * per_stage for w in (16, 32, 64)]
    cls = CIFARPreResNet if config["arch"] == "preresnet" else CIFARResNet
    model = cls(channels=widths, init_block_channels=16, bottleneck=bottleneck, in_channels=int(config["in_chans"]),
                num_classes=int(config["num_classes"]))
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)  # 32x32 as before; 24x24 crops (6x6 maps) too
    model.config = config
    return model


def create_resnet(name: str, num_classes: int | None = None, in_chans: int | None = None,
                  drop_rate: float | None = None, memory_efficient: bool = False, **unsupported: Any) -> nn.Module:
    """Build a named ResNet as ``create_model`` does a DenseNet; the DenseNet-only options raise a ConfigError
    (rather than being ignored): He et al.'s ResNets have no dropout, no dense blocks and no shared buffers."""
    if drop_rate:
        raise ConfigError(f"{name} has no dropout (He et al.'s ResNets); train it with --drop-rate 0")
    if memory_efficient:
        raise ConfigError(f"--memory-efficient is for DenseNets' dense blocks; {name} has none")
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
        raise ConfigError(f"{name} does not take {', '.join(given)} (DenseNet options); it takes num_classes, "
                          f"in_chans")
    config = model_config(name)
    if num_classes is not None:
        config["num_classes"] = int(num_classes)
    if in_chans is not None:
        config["in_chans"] = int(in_chans)
    return build_resnet(config)
