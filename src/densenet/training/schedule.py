"""Optimiser and learning-rate schedules: the paper's, and two for short runs.

- ``step`` (the paper's): SGD with Nesterov momentum 0.9 (dampening 0) and weight decay 1e-4; the rate
  starts at 0.1 and is divided by 10 at 50% and 75% of the epochs (CIFAR, SVHN) or at epochs 30 and 60
  (ImageNet). It changes once per epoch.
- ``onecycle``: torch's OneCycleLR, stepped after every optimiser step: a linear warm-up from lr/25 to
  ``lr`` over the first ``warmup`` fraction of the steps, then a linear decay to (almost) zero. Momentum
  stays fixed. Short budgets learn most with it (Smith & Topin, 2019, "super-convergence").
- ``cosine``: a linear warm-up over the first ``warmup`` fraction, then cosine annealing to zero, per step.

Weight decay applies to every parameter (the paper's), or with ``weight_decay_on="weights"`` to the
convolution and linear weights only: decaying BN scales and biases only shrinks them towards zero, which a
short run cannot afford. The scheduler's state is a step count, so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch

from densenet.training.options import TrainOptions


def parameter_groups(model: torch.nn.Module, options: TrainOptions) -> list[dict]:
    """One group (the paper's), or weights (decayed) and BN/bias parameters (not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if options.weight_decay_on == "all":
        return [{"params": params, "weight_decay": options.weight_decay}]
    decay = [p for p in params if p.dim() > 1]  # conv and linear weights; BN weights, biases are 1-D
    rest = [p for p in params if p.dim() <= 1]
    return [{"params": decay, "weight_decay": options.weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.SGD:
    return torch.optim.SGD(parameter_groups(model, options), lr=options.lr, momentum=options.momentum, dampening=0,
                           nesterov=options.nesterov and options.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions,
                    steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of ``options.schedule``; ``per_step(options)`` says whether to step it after every batch."""
    if options.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(options.milestones),
                                                    gamma=options.lr_gamma)
    total = max(1, options.epochs * steps_per_epoch)
    if options.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=options.lr, total_steps=total, pct_start=options.warmup, anneal_strategy="linear",
            cycle_momentum=False, div_factor=25.0, final_div_factor=1e4)
    warm = int(round(options.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def per_step(options: TrainOptions) -> bool:
    return options.schedule != "step"


def lr_at(epoch: int, options: TrainOptions) -> float:
    """The learning rate of (0-based) ``epoch`` under the step schedule: for reports and tests."""
    return options.lr * options.lr_gamma ** sum(epoch >= m for m in options.milestones)
