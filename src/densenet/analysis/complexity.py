"""Parameters, multiply-accumulates and the paper's Table 1 view of a network.

MACs count convolutions and the linear layer (the paper's convention: BN, ReLU and pooling are free).
Both counts follow from the configuration alone, layer by layer as the paper's formulas give them
(``config_parameters``, ``config_macs``: no torch, so ``densenet list`` answers at once); the tests check
them against the built model's parameters and against forward hooks on every convolution. Table 1 comes
from a shape-only ("meta") copy of the model, so even DenseNet-264 costs nothing.

    densenet summary densenet121     # Table 1 row, 7,978,856 parameters, 2.83 GMACs
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from densenet.models import registry

if TYPE_CHECKING:
    from torch import nn

    from densenet.models.densenet import DenseNet


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layers(config: Mapping[str, Any], input_size: int):
    """Every convolution and the linear layer of the network ``config`` describes, in order, as
    (input channels, output channels, kernel side, output side) (the linear layer: kernel and side 1), and
    the BatchNorm layers as (channels, None, 0, 0)."""
    k = config["growth_rate"]
    width = config.get("bottleneck_width") or 0
    channels = config.get("num_init_features") or (2 * k if width else 16)
    in_chans = config.get("in_chans", 3)
    size = input_size
    if config.get("stem", "imagenet") == "imagenet":
        size = (size + 2 * 3 - 7) // 2 + 1  # 7x7 convolution, stride 2, padding 3
        yield in_chans, channels, 7, size
        yield channels, None, 0, 0
        size = (size + 2 * 1 - 3) // 2 + 1  # 3x3 max-pool, stride 2, padding 1
    else:
        if config.get("stem") == "strided":
            size = (size + 2 * 1 - 3) // 2 + 1  # 3x3 convolution, stride 2, padding 1
        yield in_chans, channels, 3, size
    blocks = list(config["block_config"])
    for i, num_layers in enumerate(blocks):
        for layer in range(num_layers):
            c = channels + layer * k
            yield c, None, 0, 0
            if width:
                yield c, width * k, 1, size  # the bottleneck's 1x1
                yield width * k, None, 0, 0
                yield width * k, k, 3, size
            else:
                yield c, k, 3, size
        channels += num_layers * k
        if i != len(blocks) - 1:
            out = int(math.floor(config.get("compression", 1.0) * channels))
            yield channels, None, 0, 0
            yield channels, out, 1, size  # the transition's 1x1, then 2x2 average pooling
            channels, size = out, (size - 2) // 2 + 1
    yield channels, None, 0, 0  # norm5
    if config.get("num_classes", 1000) > 0:
        yield channels, config.get("num_classes", 1000), 1, 1


def config_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of the DenseNet ``config`` describes (``DenseNet(**config)``): weights, BN scales and shifts,
    the classifier's bias; without building it."""
    total, dims = 0, int(config.get("spatial_dims", 2))
    for c_in, c_out, kernel, _ in _layers(config, registry.default_input_size(config.get("stem", "imagenet"))):
        total += 2 * c_in if c_out is None else c_in * c_out * kernel**dims
    classes = config.get("num_classes", 1000)
    return total + (classes if classes > 0 else 0)


def config_macs(config: Mapping[str, Any], input_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions and the linear layer); a 1D or 3D
    network (``spatial_dims``) on an input of ``input_size`` along every axis."""
    size = input_size or registry.default_input_size(config.get("stem", "imagenet"))
    dims = int(config.get("spatial_dims", 2))
    return sum(c_in * c_out * kernel**dims * side**dims
               for c_in, c_out, kernel, side in _layers(config, size) if c_out is not None)


@dataclass
class Stage:
    """One row of Table 1: a layer group, its output size, and how it is made."""

    name: str
    output_size: str
    composition: str
    channels: int


def _shape_copy(model: DenseNet) -> DenseNet:
    import torch

    from densenet.models.densenet import DenseNet

    # Rebuild on the meta device from the model's own description: no memory, no arithmetic.
    with torch.device("meta"):
        return DenseNet(growth_rate=model.growth_rate, block_config=model.block_config,
                        num_init_features=model.features.conv0.out_channels,
                        bottleneck_width=model.bottleneck_width, compression=model.compression, stem=model.stem,
                        in_chans=model.in_chans, num_classes=model.num_classes)


def count_macs(model: DenseNet, input_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions and the linear layer)."""
    return config_macs(model.config, input_size)


def table1(model: DenseNet, input_size: int | None = None) -> list[Stage]:
    """The network as the paper's Table 1: stem, each dense block and transition, classification layer."""
    import torch

    from densenet.models.densenet import DenseBlock, Transition

    size = input_size or registry.default_input_size(model.stem)
    meta = _shape_copy(model).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
               for name, module in meta.features.named_children()]
    with torch.no_grad():
        meta(torch.empty(1, model.in_chans, size, size, device="meta"))
    for h in handles:
        h.remove()

    def hw(name: str) -> str:
        return f"{shapes[name][2]}x{shapes[name][3]}"

    rows: list[Stage] = []
    conv0 = meta.features.conv0
    k = conv0.kernel_size[0]
    stride = f", stride {conv0.stride[0]}" if conv0.stride[0] > 1 else ""
    rows.append(Stage("Convolution", hw("conv0"), f"{k}x{k} conv{stride}", conv0.out_channels))
    if "pool0" in shapes:
        rows.append(Stage("Pooling", hw("pool0"), "3x3 max pool, stride 2", shapes["pool0"][1]))
    layer = "[1x1 conv, 3x3 conv]" if model.bottleneck_width else "[3x3 conv]"
    for name, module in meta.features.named_children():
        if isinstance(module, DenseBlock):
            rows.append(Stage(f"Dense Block ({name[len('denseblock'):]})", hw(name),
                              f"{layer} x {len(module)}", shapes[name][1]))
        elif isinstance(module, Transition):
            index = name[len("transition"):]
            rows.append(Stage(f"Transition Layer ({index})", hw(name),
                              "1x1 conv -> 2x2 average pool, stride 2", shapes[name][1]))
    rows.append(Stage("Classification Layer", "1x1",
                      f"{hw('norm5')} global average pool -> {model.num_classes}-way fully-connected, softmax",
                      model.num_classes))
    return rows


def format_table1(name: str, model: DenseNet, input_size: int | None = None) -> str:
    size = input_size or registry.default_input_size(model.stem)
    rows = table1(model, size)
    width = max(len(r.name) for r in rows)
    out_width = max(len(r.output_size) for r in rows)
    kind = "DenseNet-BC" if model.bottleneck_width and model.compression < 1 else (
        "DenseNet-B" if model.bottleneck_width else "DenseNet-C" if model.compression < 1 else "DenseNet")
    lines = [f"{name}  ({kind}, growth rate k={model.growth_rate}, input {model.in_chans}x{size}x{size})", ""]
    lines.append(f"{'Layers':<{width}}  {'Output':>{out_width}}  {'Maps':>5}  {name}")
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.output_size:>{out_width}}  {r.channels:>5}  {r.composition}")
    lines.append("")
    lines.append(f"Parameters: {count_parameters(model):,}")
    lines.append(f"MACs at {size}x{size}: {count_macs(model, size) / 1e9:.2f} G (convolutions and the linear layer)")
    return "\n".join(lines)
