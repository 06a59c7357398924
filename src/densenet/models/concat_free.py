"""The standard dense block without repeated concatenation or repeated BN statistics.

torchvision's dense layer l concatenates all l earlier maps (a fresh copy, O(L^2) data per block) and its
BN1 recomputes the batch mean and variance of every channel, though a channel's statistics never change
once it is written. Here

- the block's maps are written once into one buffer (N, C_in + L*k, H, W); layer l's BN1 reads the view
  ``buffer[:, :C_in + l*k]``;
- each channel's batch mean and variance are computed once, when it enters the buffer; BN1 then runs BN's
  one-pass inference kernel with them, with ReLU applied in place on its fresh output;
- the backward pass is torch's own fused BN backward (``native_batch_norm_backward`` in training mode, so
  the gradient through the batch statistics is exactly BN's), and hands each earlier map its slice.

Unlike the memory-efficient mode (models/efficient.py) nothing is recomputed: BN1-ReLU outputs are kept, as
in torchvision, for speed. Parameters, running statistics, outputs and gradients equal the plain layer's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

aten = torch.ops.aten


class BlockBuffer:
    """The maps of one dense block's forward pass, in one tensor, with per-channel batch statistics."""

    def __init__(self, x: Tensor, total_channels: int) -> None:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        n, _, h, w = x.shape
        self.data = torch.empty((n, total_channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        self.sizes: list[int] = []  # channels of each map written so far
        self.means: list[Tensor] = []
        self.variances: list[Tensor] = []

    @property
    def channels(self) -> int:
        return sum(self.sizes)

    def append(self, maps: Sequence[Tensor]) -> None:
        """Write the maps not yet in the buffer (the last ones of ``maps``)."""
        for t in maps[len(self.sizes):]:
            c = self.channels
            self.data[:, c:c + t.shape[1]].copy_(t)
            self.sizes.append(t.shape[1])

    def batch_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel batch mean and biased variance of every channel written, each computed once."""
        start = sum(self.sizes[:len(self.means)])
        for size in self.sizes[len(self.means):]:
            t = self.data[:, start:start + size]
            acc = torch.promote_types(t.dtype, torch.float32)
            var, mean = torch.var_mean(t.to(acc), dim=(0, 2, 3), correction=0)
            self.means.append(mean)
            self.variances.append(var)
            start += size
        return torch.cat(self.means), torch.cat(self.variances)


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What a training-mode nn.BatchNorm2d forward does to its running statistics."""
    if not (bn.track_running_stats and bn.running_mean is not None):
        return
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)


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
                _update_running_stats(bn, mean, var, x.numel() // c)
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


def concat_bn_relu(buffer: BlockBuffer, bn: nn.BatchNorm2d, maps: Sequence[Tensor]) -> Tensor:
    return _ConcatBatchNormReLU.apply(buffer, bn, bn.weight, bn.bias, *maps)


def block_output(buffer: BlockBuffer, maps: Sequence[Tensor]) -> Tensor:
    return _BlockOutput.apply(buffer, *maps)
