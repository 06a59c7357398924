"""The paper's optimiser and learning-rate schedule.

SGD with Nesterov momentum 0.9 (dampening 0) and weight decay 1e-4; the learning rate starts at 0.1 and
is divided by 10 at 50% and 75% of the epochs (CIFAR, SVHN) or at epochs 30 and 60 (ImageNet). The
scheduler steps once per epoch, so its state is just the epoch count and resumes exactly.
"""

from __future__ import annotations

import torch

from densenet.training.options import TrainOptions


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=options.lr, momentum=options.momentum, dampening=0,
                           weight_decay=options.weight_decay, nesterov=options.nesterov and options.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(options.milestones), gamma=options.lr_gamma)


def lr_at(epoch: int, options: TrainOptions) -> float:
    """The learning rate of (0-based) ``epoch``: what the scheduler gives, as a formula for reports and tests."""
    return options.lr * options.lr_gamma ** sum(epoch >= m for m in options.milestones)
