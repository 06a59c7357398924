"""``densenet list`` and ``densenet summary NAME``: the named models and their Table 1 view.

``list`` reads the registry and counts parameters and MACs from each configuration, without torch.
"""

from __future__ import annotations

import argparse

from densenet.errors import ConfigError


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=None, help="count parameters with this many classes")


def run_list(args: argparse.Namespace) -> int:
    from densenet.analysis.complexity import config_macs, config_parameters
    from densenet.models.registry import default_input_size, list_models, model_config

    if args.num_classes is not None and args.num_classes < 0:
        raise ConfigError(f"--num-classes must be >= 0, got {args.num_classes}")
    print(f"{'model':<20} {'form':<9} {'input':>5} {'classes':>7} {'params':>12} {'MACs':>9}")
    for name in list_models():
        config = model_config(name)
        if args.num_classes is not None:
            config["num_classes"] = args.num_classes
        size = default_input_size(config["stem"])
        print(f"{name:<20} {config['stem']:<9} {size:>5} {config['num_classes']:>7} {config_parameters(config):>12,} "
              f"{config_macs(config, size) / 1e9:>8.2f}G")
    from densenet.models.resnet import RESNETS  # counted by building them (torch): densenet summary NAME

    print(f"comparison networks (pip install densenet-paper[compare]; parameters and MACs: densenet summary NAME): "
          f"{', '.join(RESNETS)}")
    return 0
    from densenet.analysis.figure4 import network_cost

    classes = 10 if args.num_classes is None else args.num_classes
    for name in RESNETS:  # the paper's Figure 4 comparison networks (models/resnet.py)
        params, macs = network_cost(name, classes, 3, 32)
        print(f"{name:<20} {'cifar':<9} {32:>5} {classes:>7} {params:>12,} {macs / 1e9:>8.2f}G")
    return 0


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a name from `densenet list`, or densenet[_bc]{L}_k{k}")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-chans", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=None, help="default: 32 (CIFAR form), 224 (ImageNet)")


def run_summary(args: argparse.Namespace) -> int:
    from densenet.analysis.complexity import format_table1
    from densenet.models.registry import create_model
    from densenet.models.resnet import is_resnet

    if is_resnet(args.model):  # no Table 1 for a ResNet: its size and cost, counted as densenet analyze figure4 does
        from densenet.analysis.figure4 import network_cost

        size = args.input_size or 32
        params, macs = network_cost(args.model, args.num_classes or 10, args.in_chans or 3, size)
        print(f"{args.model}  (pytorchcv's CIFAR ResNet, models/resnet.py)\n\nParameters: {params:,}\n"
              f"MACs at {size}x{size}: {macs / 1e9:.2f} G (convolutions and the linear layer)")
        return 0
    overrides = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    model = create_model(args.model, **overrides)
    if args.input_size is not None and args.input_size < (32 if model.stem == "imagenet" else 4):
        raise ConfigError(f"--input-size {args.input_size} is too small for the {model.stem} form")
    print(format_table1(args.model, model, args.input_size))
    return 0
