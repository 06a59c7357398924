"""``densenet list`` and ``densenet summary NAME``: the named models and their Table 1 view."""

from __future__ import annotations

import argparse

from densenet.analysis.complexity import count_macs, count_parameters, default_input_size, format_table1
from densenet.models.registry import create_model, list_models


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=None, help="count parameters with this many classes")


def run_list(args: argparse.Namespace) -> int:
    print(f"{'model':<20} {'form':<9} {'input':>5} {'classes':>7} {'params':>12} {'MACs':>9}")
    for name in list_models():
        overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(name, **overrides)
        size = default_input_size(model)
        print(f"{name:<20} {model.stem:<9} {size:>5} {model.num_classes:>7} {count_parameters(model):>12,} "
              f"{count_macs(model) / 1e9:>8.2f}G")
    return 0


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a name from `densenet list`, or densenet[_bc]{L}_k{k}")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-chans", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=None, help="default: 32 (CIFAR form), 224 (ImageNet)")


def run_summary(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    model = create_model(args.model, **overrides)
    if args.input_size is not None and args.input_size < (32 if model.stem == "imagenet" else 4):
        raise ValueError(f"--input-size {args.input_size} is too small for the {model.stem} form")
    print(format_table1(args.model, model, args.input_size))
    return 0
