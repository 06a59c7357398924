"""Batch-norm folding for inference: what folds in a pre-activation DenseNet, and a copy with it folded.

A BN folds into a convolution when it is the only reader of that convolution's output (BN(conv(x)) is an
affine conv). In a DenseNet most BNs come *before* their convolution, behind a ReLU, and those do not fold:

- a bottleneck layer's ``norm2`` reads only ``conv1``'s output -> folds into ``conv1`` (half the BNs of a -BC);
- the ImageNet stem's ``norm0`` reads only ``conv0`` -> folds into ``conv0``;
- a layer's ``conv2`` output and a transition's ``conv`` output are read by *every* later ``norm1`` of the
  block (each with its own scale, behind a ReLU), the next transition and ``norm5`` -> nothing folds there.

    folded = fold_batchnorm(model)      # an eval-mode copy; the original is untouched
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from densenet.models.densenet import DenseLayer, DenseNet


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution with bias equal to ``bn(conv(x))`` for BN in eval mode (its running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm(model: DenseNet) -> DenseNet:
    """An eval-mode copy of ``model`` with every foldable BN merged into the convolution before it."""
    folded = copy.deepcopy(model).eval()
    features = folded.features
    if isinstance(getattr(features, "norm0", None), nn.BatchNorm2d):
        features.conv0 = fold_conv_bn(features.conv0, features.norm0)
        features.norm0 = nn.Identity()
    for module in folded.modules():
        if isinstance(module, DenseLayer) and module.bottleneck and isinstance(module.norm2, nn.BatchNorm2d):
            module.conv1 = fold_conv_bn(module.conv1, module.norm2)
            module.norm2 = nn.Identity()
    return folded
