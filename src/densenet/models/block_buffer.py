"""The piece the concatenation-free and the memory-efficient dense blocks share: the block buffer.

The plain block (models/densenet.py) concatenates the l earlier maps afresh for every layer l, and that
layer's first BN computes the batch mean and variance of every channel again. Both faster blocks instead
write each map once into one tensor (N, C_in + L*k, *spatial), from which layer l reads the view
``data[:, :C_in + l*k]``; and since a channel's batch statistics never change once it is written, they are
computed once, when first asked for, and reused by every later layer.

Maps are (N, C, *spatial) with one, two or three spatial dimensions (signals, images, volumes): every
per-channel reduction and broadcast here takes its dimensions from the tensor, not from a 2D shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

aten = torch.ops.aten


def channels_last_format(x: Tensor) -> torch.memory_format | None:
    """torch.channels_last (4D) or torch.channels_last_3d (5D) when ``x`` is laid out so (and not also
    contiguous, as a tensor with one channel or one pixel is); None otherwise (1D maps have no such layout)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt if fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous() else None


def spatial_dims_of(t: Tensor) -> tuple[int, ...]:
    """The dimensions BN reduces over besides the batch: (2,), (2, 3) or (2, 3, 4)."""
    return tuple(range(2, t.dim()))


class BlockBuffer:
    """The maps of one dense block's forward pass in one tensor, with each channel's batch statistics."""

    def __init__(self, x: Tensor, total_channels: int, dtype: torch.dtype | None = None) -> None:
        # channels_last input: the buffer too, so that its slices keep the layout the convolutions were given.
        layout = channels_last_format(x)
        self.channels_last = layout is not None
        fmt = layout or torch.contiguous_format
        n, _, *spatial = x.shape
        self.data = torch.empty((n, total_channels, *spatial), dtype=dtype or x.dtype, device=x.device,
                                memory_format=fmt)
        self.sizes: list[int] = []  # channels of each map written so far
        self._means: list[Tensor] = []
        self._variances: list[Tensor] = []

    @property
    def channels(self) -> int:
        return sum(self.sizes)

    def write(self, t: Tensor) -> None:
        """Write one map into the next channels."""
        c = self.channels
        self.data[:, c:c + t.shape[1]].copy_(t)
        self.sizes.append(t.shape[1])

    def append(self, maps: Sequence[Tensor]) -> None:
        """Write the maps of ``maps`` not yet in the buffer (its last ones)."""
        for t in maps[len(self.sizes):]:
            self.write(t)

    def batch_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel batch mean and biased variance of every channel written, each channel's computed once."""
        start = sum(self.sizes[:len(self._means)])
        for size in self.sizes[len(self._means):]:
            mean, var = batch_mean_var(self.data[:, start:start + size])
            self._means.append(mean)
            self._variances.append(var)
            start += size
        return torch.cat(self._means), torch.cat(self._variances)


def batch_mean_var(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of (N, C, *spatial), in float32 at least (BN's accumulation type)."""
    acc = torch.promote_types(t.dtype, torch.float32)
    var, mean = torch.var_mean(t.to(acc), dim=(0, *spatial_dims_of(t)), correction=0)
    return mean, var


def per_channel(t: Tensor, dims: int = 2) -> Tensor:
    """A (C,) vector as (1, C, 1, ...) with ``dims`` trailing ones, to broadcast over (N, C, *spatial)."""
    return t.view(1, -1, *([1] * dims))


def bn_affine(bn: _BatchNorm, weight, bias, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BN's transform as ATen computes it on the CPU: y = x * alpha + beta, alpha = weight / sqrt(var + eps),
    beta = bias - mean * alpha; also returns invstd = 1 / sqrt(var + eps)."""
    invstd = (var + bn.eps).sqrt().reciprocal()
    alpha = invstd if weight is None else invstd * weight
    beta = -mean * alpha if bias is None else bias - mean * alpha
    return alpha, beta, invstd


def bn_factors(bn: _BatchNorm, weight, bias, mean: Tensor, var: Tensor, like: Tensor):
    """BN's per-channel transform for maps like ``like``: ReLU(BN(x)) = ReLU((x - center) * scale + shift).

    Under bf16 autocast the block's maps are bf16 and BN's statistics float32. An element-wise op that mixes
    them computes in float32, and on a CPU it first copies each bf16 operand to a new float32 tensor and
    writes through a float32 temporary: in a bf16 channels_last training step those hidden copies (of
    strided slices of the buffer) took half the time (2026-11-30). So the factors are given in the maps'
    dtype, and each op is one pass that allocates nothing. The rounded mean is taken off first: as
    x * alpha + beta, the rounding of beta = bias - mean * alpha would shift each channel by up to
    |mean * alpha| * 2^-9 (up to 10x the error of rounding a float32 result once, at mean/std 8); centred,
    the shift, bias + (center - mean) * alpha, is about the bias, and so is its rounding. In float32 and
    float64, center is None and this is x * alpha + beta, as ATen's CPU batch norm computes it.
    Returns center (None or a per-channel view), scale and shift (per-channel views) and invstd.
    """
    alpha, beta, invstd = bn_affine(bn, weight, bias, mean, var)
    dims = like.dim() - 2
    if like.dtype == alpha.dtype:
        return None, per_channel(alpha, dims), per_channel(beta, dims), invstd
    center = mean.to(like.dtype)
    shift = beta + center.to(alpha.dtype) * alpha
    return (per_channel(center, dims), per_channel(alpha.to(like.dtype), dims), per_channel(shift.to(like.dtype), dims),
            invstd)


def normalize_relu_(x: Tensor, factors, out: Tensor) -> Tensor:
    """ReLU(BN(x)) with the factors of bn_factors, written into ``out``: nothing of x's size is allocated."""
    center, scale, shift, _ = factors
    if center is None:
        return torch.addcmul(shift, x, scale, out=out).relu_()
    return torch.addcmul(shift, torch.sub(x, center, out=out), scale, out=out).relu_()


def normalize_relu(x: Tensor, bn: _BatchNorm, weight, bias, mean: Tensor, var: Tensor, out: Tensor) -> Tensor:
    """ReLU(BN(x)) with the given statistics (batch or running), written into ``out``."""
    return normalize_relu_(x, bn_factors(bn, weight, bias, mean, var, x), out)


def update_running_stats(bn: _BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """What a training-mode batch norm (1D, 2D or 3D) forward does to its running statistics, given the batch's."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def batch_norm_backward(grad: Tensor, x: Tensor, weight, mean: Tensor, var: Tensor, eps: float, batch: bool,
                        mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """torch's fused BN backward kernel for BN(x) given its statistics: batch statistics (``batch``, the
    gradient also flows through the mean and variance, as in a training-mode batch norm) or running
    ones; ``mask`` asks for the gradients of (input, weight, bias). Both buffer blocks call it."""
    if batch:
        return aten.native_batch_norm_backward(grad, x, weight, None, None, mean, torch.rsqrt(var + eps), True, eps,
                                               mask)
    return aten.native_batch_norm_backward(grad, x, weight, mean, var, None, None, False, eps, mask)
