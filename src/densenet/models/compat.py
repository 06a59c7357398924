"""torchvision compatibility: its state dicts (current and 2017 key names, timm's, DDP-wrapped) load into
ours, and ``torchvision_reference`` builds torchvision's own DenseNet with our weights (the oracle of the
tests and the baseline of ``densenet bench``).

torchvision's 2017 checkpoints named the dense-layer modules ``norm.1``, ``relu.1``, ``conv.1``, ``norm.2``...
(a Sequential with dotted names); today's use ``norm1``, ``conv1``... The published ImageNet weights
still have the old names, which is why torchvision remaps them when it loads; so do we.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from densenet.errors import ConfigError, DenseNetError

_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var"
                     r"|num_batches_tracked))$")
_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def remap_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename 2017 torchvision keys (``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``) and
    drop DDP/compile prefixes; other keys pass through unchanged."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPERS:
            while key.startswith(prefix):
                key = key[len(prefix):]
        match = _LEGACY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def load_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """``model.load_state_dict`` that also takes torchvision's 2017 keys and wrapped (DDP) checkpoints."""
    return model.load_state_dict(remap_legacy_keys(state_dict), strict=strict)


def torchvision_reference(model: nn.Module, memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet with the same architecture and weights as our ``model`` (a ``DenseNet``).

    torchvision builds DenseNet-BC only (bottleneck layers, compression 0.5); the CIFAR form gets its 3x3 stem
    by replacing torchvision's 7x7 convolution and dropping its max-pool. ``memory_efficient`` is torchvision's
    (gradient checkpointing of each layer's bottleneck).
    """
    import torchvision

    cfg = model.config
    if cfg.get("spatial_dims", 2) != 2:
        raise ConfigError(f"torchvision's DenseNet is 2D only; this model has spatial_dims={cfg['spatial_dims']} "
                          f"(compare 1D and 3D models with MONAI's DenseNet instead)")
    if not cfg["bottleneck_width"] or cfg["compression"] != 0.5 or cfg["drop_rate"]:
        raise ConfigError("torchvision's DenseNet has bottleneck layers and compression 0.5 only; "
                          "benchmark a DenseNet-BC such as densenet_bc100_k12 or an ImageNet model")
    reference = torchvision.models.DenseNet(
        growth_rate=cfg["growth_rate"], block_config=tuple(cfg["block_config"]),
        num_init_features=cfg["num_init_features"], bn_size=cfg["bottleneck_width"],
        num_classes=cfg["num_classes"] or 1000, memory_efficient=memory_efficient)
    if cfg["stem"] in ("cifar", "strided"):
        reference.features.conv0 = nn.Conv2d(cfg["in_chans"], cfg["num_init_features"], 3, padding=1, bias=False,
                                             stride=2 if cfg["stem"] == "strided" else 1)
        del reference.features.norm0, reference.features.relu0, reference.features.pool0
    elif cfg["in_chans"] != 3:
        raise ConfigError("the torchvision reference takes 3 input channels; drop --in-chans")
    reference.load_state_dict(model.state_dict())
    return reference


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str, strict: bool = True) -> None:
    """``load_state_dict`` with a one-line, actionable message when the architectures differ."""
    own = model.state_dict()
    state = remap_legacy_keys(state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        detail = "; ".join(part for part in (
            f"{len(mismatched)} shapes differ (e.g. {mismatched[0]})" if mismatched else "",
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "") if part)
        raise DenseNetError(f"{source} does not fit this model ({detail}): another architecture or class count?")
    model.load_state_dict(state, strict=strict)
