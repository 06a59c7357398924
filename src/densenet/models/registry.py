"""The paper's networks as data: a name -> configuration table, and ``create_model`` over it.

CIFAR/SVHN form (Table 2): three equal blocks; depth L = 3n + 4 (basic) or 6n + 4 (bottleneck).
ImageNet form (Table 1): four blocks with bottleneck and compression 0.5, growth 32 (48 for 161).
Beyond the named models, any valid ``densenet{L}_k{k}`` or ``densenet_bc{L}_k{k}`` builds too, and the paper's
Figure 4 variants with one of the two changes: ``densenet_b{L}_k{k}`` (bottleneck layers, no compression) and
``densenet_c{L}_k{k}`` (compression 0.5, no bottleneck). The comparison ResNets (``resnet56_cifar``,
``preresnet1001_cifar``, ...) are models/resnet.py's, built from pytorchcv; ``create_model`` builds them too.
The table imports nothing heavy (torch comes with ``create_model``), so ``densenet list`` answers at once.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

from densenet.errors import ConfigError
from densenet.models import resnet

if TYPE_CHECKING:
    from densenet.models.densenet import DenseNet


def cifar_config(depth: int, growth_rate: int, bc: bool) -> dict[str, Any]:
    """The paper's CIFAR/SVHN DenseNet (bc=False) or DenseNet-BC (bc=True) of depth L and growth k."""
    per_layer = 6 if bc else 3  # convolutions per dense layer x 3 blocks
    form = "6n+4" if bc else "3n+4"
    if depth < 4 + per_layer or (depth - 4) % per_layer:
        below = max(4 + per_layer, depth - (depth - 4) % per_layer)
        nearest = sorted({below, below + per_layer} if depth > below else {below})
        kind = "a DenseNet-BC" if bc else "a DenseNet"
        raise ConfigError(f"depth {depth} is not {form} for {kind}; nearest: {', '.join(map(str, nearest))}")
    n = (depth - 4) // per_layer
    return dict(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=2 * growth_rate if bc else 16,
        bottleneck_width=4 if bc else None,
        compression=0.5 if bc else 1.0,
        stem="cifar",
        num_classes=10,
    )


def imagenet_config(growth_rate: int, block_config: tuple[int, ...], num_init_features: int) -> dict[str, Any]:
    return dict(growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features,
                bottleneck_width=4, compression=0.5, stem="imagenet", num_classes=1000)


# name -> the DenseNet constructor arguments of the paper's configuration
MODELS: dict[str, dict[str, Any]] = {
    "densenet40_k12": cifar_config(40, 12, bc=False),
    "densenet100_k12": cifar_config(100, 12, bc=False),
    "densenet100_k24": cifar_config(100, 24, bc=False),
    "densenet_bc100_k12": cifar_config(100, 12, bc=True),
    "densenet_bc250_k24": cifar_config(250, 24, bc=True),
    "densenet_bc190_k40": cifar_config(190, 40, bc=True),
    "densenet121": imagenet_config(32, (6, 12, 24, 16), 64),
    "densenet169": imagenet_config(32, (6, 12, 32, 32), 64),
    "densenet201": imagenet_config(32, (6, 12, 48, 32), 64),
    "densenet264": imagenet_config(32, (6, 12, 64, 48), 64),
    "densenet161": imagenet_config(48, (6, 12, 36, 24), 96),
}

_PATTERN = re.compile(r"^densenet(?P<bc>_bc|_b|_c)?(?P<depth>\d+)_k(?P<k>\d+)$")
_OVERRIDABLE = {"num_classes", "in_chans", "drop_rate", "block_impl", "memory_efficient", "spatial_dims",
                "growth_rate", "block_config", "num_init_features", "bottleneck_width", "compression", "stem"}


def default_input_size(stem: str) -> int:
    """The image side a form is made for: 224 for the ImageNet form, 32 for the CIFAR/SVHN form."""
    return 224 if stem == "imagenet" else 32


def list_models() -> list[str]:
    """The named models of the paper, CIFAR form first."""
    return list(MODELS)


def model_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a named model (or of any valid densenet[_bc]{L}_k{k})."""
    if name in MODELS:
        return dict(MODELS[name])
    if resnet.is_resnet(name):
        return resnet.model_config(name)
    match = _PATTERN.match(name)
    if match:
        config = cifar_config(int(match["depth"]), int(match["k"]), bc=match["bc"] in ("_bc", "_b"))
        if match["bc"] in ("_b", "_c"):  # DenseNet-B: bottleneck without compression; -C: compression without
            config["compression"] = 1.0 if match["bc"] == "_b" else 0.5
        return config
    close = difflib.get_close_matches(name, [*MODELS, *resnet.RESNETS], n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown model {name!r}; {hint}choose from {', '.join(MODELS)} "
                      f"(or any densenet{{L}}_k{{k}} / densenet_bc{{L}}_k{{k}} of the CIFAR form; the comparison "
                      f"ResNets: {', '.join(resnet.RESNETS)})")


def create_model(name: str, pretrained: bool = False, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None, **overrides: Any) -> DenseNet:
    """Build a named DenseNet, e.g. ``create_model("densenet_bc100_k12", num_classes=100, drop_rate=0.2)``.

    overrides: any DenseNet constructor argument, e.g. ``block_impl="concat_free"`` (how the dense blocks
        compute, models/densenet.py; ``memory_efficient=True`` is block_impl="efficient"), or
        ``spatial_dims=3`` (the same network for volumes, ``spatial_dims=1`` for signals; every name, both forms:
        ``create_model("densenet121", spatial_dims=3, in_chans=1, num_classes=2)`` is MONAI's DenseNet121).

    pretrained: torchvision's ImageNet weights (densenet121/161/169/201), downloaded once into torch.hub's
        cache; another ``num_classes`` keeps them all but the classifier, another ``in_chans`` adapts the first
        convolution as timm does (``pretrained.adapt_input_conv``). Metadata: ``model.pretrained_cfg``.
    features_only, out_indices: a backbone as timm makes it (``densenet.models.features.DenseNetFeatures``):
        forward gives one map per selected dense block; ``feature_info.channels()`` / ``.reduction()``.
    """
    if resnet.is_resnet(name):  # the paper's Figure 4 comparison networks (pytorchcv's)
        if pretrained or features_only:
            raise ConfigError(f"{name}: no pretrained weights or features_only backbone (a comparison network)")
        return resnet.create_resnet(name, **overrides)
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise ConfigError(f"create_model does not take {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(sorted(_OVERRIDABLE))}, pretrained, features_only, out_indices")
    if out_indices is not None and not features_only:
        raise ConfigError("out_indices selects the stages of a backbone; pass features_only=True with it")
    from densenet.models.densenet import DenseNet

    config = model_config(name)
    config.update(overrides)
    if pretrained:
        from densenet.models.pretrained import PRETRAINED

        if config.get("spatial_dims", 2) != 2:
            raise ConfigError(f"the published ImageNet weights are 2D; build {name} with spatial_dims="
                              f"{config['spatial_dims']} without pretrained=True")
        if name not in PRETRAINED:
            raise ConfigError(f"no published ImageNet weights for {name!r}; pretrained=True works for "
                              f"{', '.join(PRETRAINED)}")
    model = DenseNet(**config)
    if pretrained:
        from densenet.models.pretrained import load_pretrained

        load_pretrained(model, name)
    if features_only:
        from densenet.models.features import DenseNetFeatures

        return DenseNetFeatures(model, out_indices)
    return model
