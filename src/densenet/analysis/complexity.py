"""Parameters, multiply-accumulates and the paper's Table 1 view of a network.

MACs count convolutions and the linear layer (the paper's convention: BN, ReLU and pooling are free),
measured by forward hooks on a shape-only ("meta") copy of the model, so even DenseNet-264 costs nothing.

    densenet summary densenet121     # Table 1 row, 7,978,856 parameters, 2.83 GMACs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from densenet.models.densenet import DenseBlock, DenseNet, Transition


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_input_size(model: DenseNet) -> int:
    return 224 if model.stem == "imagenet" else 32


@dataclass
class Stage:
    """One row of Table 1: a layer group, its output size, and how it is made."""

    name: str
    output_size: str
    composition: str
    channels: int


def _macs_hook(counter: list[int]):
    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            counter[0] += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            counter[0] += output.numel() * module.in_features
    return hook


def _shape_copy(model: DenseNet) -> DenseNet:
    # Rebuild on the meta device from the model's own description: no memory, no arithmetic.
    with torch.device("meta"):
        return DenseNet(growth_rate=model.growth_rate, block_config=model.block_config,
                        num_init_features=model.features.conv0.out_channels,
                        bottleneck_width=model.bottleneck_width, compression=model.compression, stem=model.stem,
                        in_chans=model.in_chans, num_classes=model.num_classes)


def count_macs(model: DenseNet, input_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions and the linear layer)."""
    size = input_size or default_input_size(model)
    meta = _shape_copy(model).eval()
    counter = [0]
    handles = [m.register_forward_hook(_macs_hook(counter)) for m in meta.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        meta(torch.empty(1, model.in_chans, size, size, device="meta"))
    for h in handles:
        h.remove()
    return counter[0]


def table1(model: DenseNet, input_size: int | None = None) -> list[Stage]:
    """The network as the paper's Table 1: stem, each dense block and transition, classification layer."""
    size = input_size or default_input_size(model)
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
    size = input_size or default_input_size(model)
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
