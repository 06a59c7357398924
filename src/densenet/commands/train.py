"""``densenet train``: the paper's training protocol on any data set, into a run folder.

    densenet train                                         # DenseNet-BC on the built-in digits, a few minutes
    densenet train --config configs/c10plus-densenet40_k12.yaml --data-dir data/cifar10
    densenet train --resume runs/cifar10-densenet40_k12-20260101-120000
    densenet train --resume runs/cifar10-densenet40_k12-20260101-120000 --fork runs/lr05 --lr 0.05
    torchrun --nproc_per_node 8 -m densenet train --config configs/imagenet-densenet121.yaml --data-dir /imagenet

Flags override the recipe; the resolved options go to RUN_DIR/config.yaml and into every checkpoint. The flags
are TrainOptions' fields (training/options.py), plus --config, --eager, --resume and --fork. The work is
``densenet.training.train.train``.
"""

from __future__ import annotations

import argparse

from densenet.errors import ConfigError
from densenet.training.options import FLAGS, add_flags
from densenet.training.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags: one per TrainOptions field (``options.add_flags``), and four of this command's own.

    Every flag defaults to None, so that only the flags actually given override a recipe.
    """
    add = parser.add_argument
    add("--config", metavar="FILE.yaml", help="a recipe (configs/*.yaml); flags given here override it")
    add_flags(parser)
    add("--eager", action="store_true", default=None, help="plain eager PyTorch, NCHW: the same as --compile off "
        "--no-channels-last")
    add("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, with its own "
        "options (--epochs may be raised for the step schedule; where and how it runs may change: --workers, "
        "--device, --data-dir...)")
    add("--fork", metavar="NEW_DIR", help="with --resume: copy the run into NEW_DIR and continue it there with the "
        "options given (another --lr, --schedule...); the original run stays as it was")


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in FLAGS}
    if getattr(args, "eager", None):
        if args.compile not in (None, "off") or args.channels_last:
            raise ConfigError("--eager means --compile off and --no-channels-last; drop one of them")
        overrides.update(compile="off", channels_last=False)
    train(recipe=args.config, overrides=overrides, resume=args.resume, fork=getattr(args, "fork", None))
    return 0
