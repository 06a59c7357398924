"""The standard dense block without repeated concatenation or repeated BN statistics.

torchvision's dense layer l concatenates all l earlier maps (a fresh copy, O(L^2) data per block) and its
BN1 recomputes the batch mean and variance of every channel, though a channel's statistics never change
once it is written. Here

- the block's maps are written once into one buffer (N, C_in + L*k, H, W); layer l's BN1 reads the view
  ``buffer[:, :C_in + l*k]`` (``models/block_buffer.py``, shared with the memory-efficient block);
- each channel's batch mean and variance are computed once, after it enters the buffer; BN1 then runs BN's
  one-pass inference kernel with them, with ReLU applied in place on its fresh output;
- the backward pass is torch's own fused BN backward (``native_batch_norm_backward`` in training mode, so
  the gradient through the batch statistics is exactly BN's), and hands each earlier map its slice.

Unlike the memory-efficient mode (models/efficient.py) nothing is recomputed: BN1-ReLU outputs are kept, as
in torchvision, for speed. Parameters, running statistics, outputs and gradients equal the plain layer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from densenet.models.block_buffer import BlockBuffer, update_running_stats

if TYPE_CHECKING:
    from densenet.models.densenet import DenseBlock, DenseLayer

aten = torch.ops.aten


def concat_free_block_forward(block: DenseBlock, x: Tensor) -> Tensor:
    """The output of ``block`` (all its maps, concatenated) for input ``x``, through one block buffer."""
    buffer = BlockBuffer(x, block.out_channels)
    features = [x]
    for layer in block.values():
        features.append(_layer_forward(layer, features, buffer))
    return _BlockOutput.apply(buffer, *features)


def _layer_forward(layer: DenseLayer, maps: Sequence[Tensor], buffer: BlockBuffer) -> Tensor:
    """``layer(maps)``, with the concatenation and the first BN-ReLU read from the buffer."""
    first_bn = layer.norm1 if layer.bottleneck else layer.norm2
    if type(first_bn) is not nn.BatchNorm2d:  # a replaced norm (folded, frozen...): the plain layer
        return layer(maps)
    y = _ConcatBatchNormReLU.apply(buffer, first_bn, first_bn.weight, first_bn.bias, *maps)
    if layer.bottleneck:
        y = layer.relu2(layer.norm2(_dropout(layer.conv1(y), layer)))
    return _dropout(layer.conv2(y), layer)


def _dropout(t: Tensor, layer: DenseLayer) -> Tensor:
    return F.dropout(t, p=layer.drop_rate, training=layer.training) if layer.drop_rate > 0 else t


class _ConcatBatchNormReLU(torch.autograd.Function):
    """ReLU(BN(cat(maps))) read from the block buffer; gradients go back to each map as a slice."""

    @staticmethod
    def forward(ctx, buffer: BlockBuffer, bn: nn.BatchNorm2d, weight, bias, *maps):
        batch_stats = bn.training or bn.running_mean is None
        buffer.append(maps)
        c = buffer.channels
        x = buffer.data[:, :c]
        if batch_stats:
            mean, var = buffer.batch_stats()
            if bn.training:
                update_running_stats(bn, mean, var, x.numel() // c)
        else:
            mean, var = bn.running_mean, bn.running_var
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, bn.eps, False).relu_()
        # The buffer view is kept as an attribute, not through save_for_backward: later layers write their
        # maps into other channels of the same storage, which would trip autograd's version check,
        # though the channels read here never change.
        ctx.x, ctx.sizes, ctx.eps, ctx.batch_stats = x, buffer.sizes[:], bn.eps, batch_stats
        ctx.save_for_backward(y, weight, bias, mean, var)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        y, weight, bias, mean, var = ctx.saved_tensors
        g = aten.threshold_backward(grad_y, y, 0)
        mask = [True, weight is not None and ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]]
        if ctx.batch_stats:
            grads = aten.native_batch_norm_backward(g, ctx.x, weight, None, None, mean, torch.rsqrt(var + ctx.eps),
                                                    True, ctx.eps, mask)
        else:
            grads = aten.native_batch_norm_backward(g, ctx.x, weight, mean, var, None, None, False, ctx.eps, mask)
        grad_x, grad_w, grad_b = grads
        del ctx.x
        return (None, None, grad_w, grad_b, *grad_x.split(ctx.sizes, dim=1))


class _BlockOutput(torch.autograd.Function):
    """cat(maps) as the block buffer itself (no copy); the gradient goes back to each map as a slice."""

    @staticmethod
    def forward(ctx, buffer: BlockBuffer, *maps):
        buffer.append(maps)
        ctx.sizes = buffer.sizes[:]
        return buffer.data

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return (None, *grad.split(ctx.sizes, dim=1))
