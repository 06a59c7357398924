"""The memory-efficient stem and transitions of ``block_impl="efficient"``: what lies between the dense blocks.

The efficient dense block (efficient.py) keeps little more than its buffer; outside the blocks, the standard
autograd graph of a training step keeps, per sample,

- in the ImageNet stem conv0 -> norm0 -> relu0 -> pool0 (3^d max-pool of stride 2): conv0's output (BN's
  input), the BN-ReLU output (the max-pool's input) and the pool's argmax, one int64 per output;
- in each transition norm -> relu -> conv (1x1) -> [drop] -> pool (2^d average): the BN-ReLU output (the
  convolution's input) and the convolution's output (the average pool's saved input).

For DenseNet-121 on 64^3 volumes these were ~33 of the efficient mode's ~43 MB per sample (2026-12-06). Here
BN-ReLU-max-pool and BN-ReLU-conv-[dropout]-pool each run as one autograd Function that keeps only what it cannot
recompute:

- the stem: conv0's output, BN's batch mean and variance, and the argmax of each output as its offset inside
  the pooling window, one byte (a 3^3 window has 27 places; the int64 flat index took eight);
- a transition: its input (the dense block's buffer, which that block keeps anyway), BN's batch mean and
  variance, and the dropout mask (bool) if the transition has dropout.

The backward pass recomputes the BN-ReLU output a few samples at a time (for the ReLU mask, the max-pool's
gradient and the 1x1 convolution's weight gradient), and BN's input gradient takes two passes over those parts:
the first gathers its batch sums, the second adds their terms (efficient._pointwise_backward, the bottleneck's
code, serves the transition). So the full-size temporaries of the backward pass are the input gradient itself
and, in a transition, the gradient of the convolution's output. BN running statistics are updated exactly once
per training forward, from the batch statistics the recomputation reuses; the results equal the standard
mode's up to rounding (tests/models/test_block_impl.py, float64, ImageNet stem in 2D and 3D).

Only a training forward with gradients runs these: in eval mode, without gradients, under torch.compile,
tracing or export, the ordinary modules run (densenet.run_features decides), so compiled graphs and exported
programs see the same modules as in the standard mode. The modules, parameters and state dict are the
standard mode's; the fused steps call no hooks of the modules inside them (norm0, relu0, pool0, a transition).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd

from densenet.models.block_buffer import (
    batch_mean_var,
    bn_factors,
    channels_last_format,
    normalize_relu_,
    per_channel,
    spatial_dims_of,
    update_running_stats,
)
from densenet.models.efficient import (
    _autocast_dtype,
    _dropout_,
    _no_autocast,
    _pointwise_backward,
    _pointwise_forward,
    _undrop,
    _Workspace,
    hand_over,
)

aten = torch.ops.aten

# The stem's and the transitions' parts of the batch are about this many bytes of their input (at least one
# sample): the recomputed BN-ReLU output and its gradient, allocated once per pass.
_PART_BYTES = 4 << 20

_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,) * dims


def _samples(x: Tensor) -> int:
    per_sample = x[:1].numel() * x.element_size()
    return max(1, min(x.shape[0], _PART_BYTES // max(per_sample, 1)))


def _trains_with_grad(bn: nn.Module, x: Tensor, params: list[Tensor | None]) -> bool:
    return (isinstance(bn, _BatchNorm) and bn.training and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, *params)))


# --- the stem: BN-ReLU-max-pool ----------------------------------------------------------------------------


def stem_fusable(norm: nn.Module, relu: nn.Module, pool: nn.Module, x: Tensor) -> bool:
    """Whether pool(relu(norm(x))) runs as one memory-efficient step: a training BN with gradients, a ReLU and a
    max-pool (no dilation, at most 256 places per window, so that an argmax fits in one byte)."""
    if not (isinstance(relu, nn.ReLU) and isinstance(pool, _MaxPoolNd) and not pool.return_indices):
        return False
    dims = x.dim() - 2
    if dims not in _MAX_POOLS or set(_tuple(pool.dilation, dims)) != {1}:
        return False
    if math.prod(_tuple(pool.kernel_size, dims)) > 256:
        return False
    return _trains_with_grad(norm, x, [norm.weight, norm.bias] if isinstance(norm, _BatchNorm) else [])


# Like the efficient blocks, these run eagerly if torch.compile reaches them (run_features gives a compiled graph
# the ordinary modules instead).
@torch.compiler.disable
def efficient_stem_forward(norm: _BatchNorm, pool: _MaxPoolNd, x: Tensor) -> Tensor:
    """pool(ReLU(norm(x))), keeping x, BN's batch statistics and one byte per output (stem_fusable must hold)."""
    return _Stem.apply(norm, pool, x, norm.weight, norm.bias)


def _max_pool(y: Tensor, pool: _MaxPoolNd) -> tuple[Tensor, Tensor]:
    """``pool(y)`` and its argmax (torch's flat int64 indices)."""
    return _MAX_POOLS[y.dim() - 2](y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                   return_indices=True)


class _Window:
    """The geometry of a max-pool over maps of ``spatial`` size: an argmax as a flat index into the input's
    spatial dimensions (torch's form) and as its offset inside the output's window (one byte)."""

    def __init__(self, pool: _MaxPoolNd, spatial: tuple[int, ...], out_spatial: tuple[int, ...],
                 device: torch.device) -> None:
        dims = len(spatial)
        self.kernel = _tuple(pool.kernel_size, dims)
        self.stride = _tuple(pool.stride if pool.stride is not None else pool.kernel_size, dims)
        self.padding = _tuple(pool.padding, dims)
        self.spatial = spatial
        # The first input position of each output's window, along each spatial dimension, broadcastable.
        self.starts = []
        for i, (size, stride, pad) in enumerate(zip(out_spatial, self.stride, self.padding, strict=True)):
            shape = [1] * (dims + 2)
            shape[2 + i] = size
            self.starts.append((torch.arange(size, device=device) * stride - pad).view(shape))
        # offset = sum_i k_i * prod(kernel[i+1:]) for the window position (k_0, ..., k_{d-1})
        self.place = [math.prod(self.kernel[i + 1:]) for i in range(dims)]

    def offsets(self, index: Tensor) -> Tensor:
        """torch's flat argmax (int64) as the offset in its window (uint8)."""
        rest, offset = index, None
        for i in reversed(range(len(self.spatial))):
            position = rest.remainder(self.spatial[i])
            rest = rest.div(self.spatial[i], rounding_mode="floor")
            term = (position - self.starts[i]) * self.place[i]
            offset = term if offset is None else offset.add_(term)
        return offset.to(torch.uint8)

    def index(self, offset: Tensor) -> Tensor:
        """The inverse of ``offsets``: the flat argmax (int64)."""
        offset, index = offset.long(), None
        for i in range(len(self.spatial)):
            position = offset.div(self.place[i], rounding_mode="floor").remainder_(self.kernel[i]).add_(self.starts[i])
            index = position if index is None else index.mul_(self.spatial[i]).add_(position)
        return index


class _Stem(torch.autograd.Function):
    @staticmethod
    def forward(ctx, norm, pool, x, weight, bias):
        n, c, *spatial = x.shape
        samples = _samples(x)
        with _no_autocast(x.device.type):
            mean, var = batch_mean_var(x)
            update_running_stats(norm, mean, var, x.numel() // c)
            factors = bn_factors(norm, weight, bias, mean, var, x)
            part = torch.empty_like(x[:samples])  # the BN-ReLU output, a few samples at a time
            outs, offsets, window = [], [], None
            for start in range(0, n, samples):
                rows = slice(start, min(start + samples, n))
                y = normalize_relu_(x[rows], factors, out=part[:rows.stop - rows.start])
                out, index = _max_pool(y, pool)
                window = window or _Window(pool, tuple(spatial), tuple(out.shape[2:]), x.device)
                outs.append(out)
                offsets.append(window.offsets(index))
                del y, index
            del part
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        ctx.norm, ctx.window = norm, window
        ctx.save_for_backward(x, torch.cat(offsets) if len(offsets) > 1 else offsets[0], mean, var, weight, bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, offsets, mean, var, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _stem_backward(ctx.norm, ctx.window, x, offsets, mean, var, weight, bias,
                                                        grad_out)
        return None, None, grad_x, grad_weight, grad_bias


def _stem_backward(norm: _BatchNorm, window: _Window, x: Tensor, offsets: Tensor, mean: Tensor, var: Tensor,
                   weight, bias, grad_out: Tensor):
    """The input, weight and bias gradients of pool(ReLU(BN(x))) with BN's batch statistics, part by part.

    Each part recomputes ReLU(BN(x)); the max-pool's gradient is scattered to the argmax of each output
    (several outputs may share one input: their gradients add, as in torch's kernel), the ReLU's mask applied,
    and BN's input gradient, (gy - sum(gy)/M - (x - mean) * dotp * invstd^2 / M) * invstd * weight (ATen's CPU
    formulas), written in two passes: gy * invstd * weight at once, the batch-sum terms once the sums are known.
    """
    n, c, *spatial = x.shape
    nd, dims, acc = len(spatial), (0, *spatial_dims_of(x)), mean.dtype
    samples = _samples(x)
    with _no_autocast(x.device.type):
        factors = bn_factors(norm, weight, bias, mean, var, x)
        center, scale, _, invstd = factors
        center = per_channel(mean, nd) if center is None else center
        grad_out = grad_out.to(x.dtype)
        grad_x = torch.empty_like(x)
        part_y = torch.empty_like(x[:samples])
        part_g = torch.empty((samples, c, *spatial), dtype=x.dtype, device=x.device)  # contiguous: a scatter target
        sum_dy = torch.zeros(c, dtype=acc, device=x.device)
        dotp = torch.zeros(c, dtype=acc, device=x.device)
        for start in range(0, n, samples):
            rows = slice(start, min(start + samples, n))
            m = rows.stop - rows.start
            xs, y, g = x[rows], part_y[:m], part_g[:m]
            normalize_relu_(xs, factors, out=y)
            g.zero_().flatten(2).scatter_add_(2, window.index(offsets[rows]).flatten(2), grad_out[rows].flatten(2))
            aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
            sum_dy += g.sum(dims, dtype=acc)
            torch.sub(xs, center, out=y)
            dotp += y.mul_(g).sum(dims, dtype=acc)
            torch.mul(g, scale, out=grad_x[rows])
        del part_g
        # As in _pointwise_backward: with the mean rounded to the maps' dtype (bn_factors), the rounding's share of
        # dotp is (mean - center) * sum_dy.
        center_acc, scale_acc = center.flatten().to(acc), scale.flatten().to(acc)
        dotp += (center_acc - mean) * sum_dy
        count = x.numel() // c
        k = dotp * invstd * invstd / count
        a = per_channel((-scale_acc * k).to(x.dtype), nd)
        b = per_channel((-scale_acc * ((center_acc - mean) * k + sum_dy / count)).to(x.dtype), nd)
        for start in range(0, n, samples):
            rows = slice(start, min(start + samples, n))
            t = torch.sub(x[rows], center, out=part_y[:rows.stop - rows.start])
            grad_x[rows].addcmul_(t, a).add_(b)
    grad_weight = None if weight is None else (dotp * invstd).to(weight.dtype)
    grad_bias = None if bias is None else sum_dy.to(bias.dtype)
    return grad_x, grad_weight, grad_bias


# --- a transition: BN-ReLU-conv1x1-[dropout]-avg-pool ----------------------------------------------------------


def transition_fusable(transition: nn.Module, x: Tensor) -> bool:
    """Whether ``transition`` (models/densenet.py's Transition) runs as one memory-efficient step: a training BN
    with gradients, ReLU, a bias-free ungrouped 1x1 convolution, optional dropout and a non-overlapping average
    pool without padding, in that order."""
    names = list(transition._modules)
    if names not in (["norm", "relu", "conv", "pool"], ["norm", "relu", "conv", "drop", "pool"]):
        return False
    conv, pool, dims = transition.conv, transition.pool, x.dim() - 2
    if not (isinstance(transition.relu, nn.ReLU) and isinstance(conv, nn.modules.conv._ConvNd)
            and isinstance(pool, _AvgPoolNd)) or ("drop" in names and not isinstance(transition.drop, nn.Dropout)):
        return False
    if (conv.bias is not None or conv.groups != 1 or set(conv.kernel_size) != {1} or set(conv.stride) != {1}
            or set(_tuple(conv.padding, dims)) != {0} or set(conv.dilation) != {1}):
        return False
    kernel = _tuple(pool.kernel_size, dims)
    if (_tuple(pool.stride, dims) != kernel or set(_tuple(pool.padding, dims)) != {0} or pool.ceil_mode
            or getattr(pool, "divisor_override", None) is not None):
        return False
    norm = transition.norm
    return _trains_with_grad(norm, x, [norm.weight, norm.bias, conv.weight] if isinstance(norm, _BatchNorm) else [])


@torch.compiler.disable
def efficient_transition_forward(transition: nn.Module, x: Tensor, private_input: bool = False) -> Tensor:
    """``transition(x)``, keeping x, BN's batch statistics and the dropout mask (transition_fusable must hold).

    ``private_input``: x is the output of an efficient dense block that nothing but this transition sees (no
    hook, no caller); the input gradient is then handed over to that block (efficient.hand_over), which
    accumulates into it instead of into a copy.
    """
    return _Transition.apply(transition, private_input, x, transition.norm.weight, transition.norm.bias,
                             transition.conv.weight)


class _TransitionWorkspaces:
    """What efficient._pointwise_forward and _pointwise_backward use, for one transition and pass: forward, the
    BN-ReLU output ``wide`` (its conv-dtype copy ``wide_cast`` under autocast) and the convolution's output ``mid``;
    backward, two parts of ``samples`` samples (``part``, ``part_grad``, ``part_cast``) and no full-batch one."""

    def __init__(self, x: Tensor, out_channels: int, conv_dtype: torch.dtype, channels_last: bool,
                 backward: bool) -> None:
        c, cast = x.shape[1], conv_dtype != x.dtype
        self.wide = self.wide_cast = self.mid = self.part = self.part_grad = self.part_cast = None
        self.samples = 0
        if not backward:
            self.wide = _Workspace(x, c, x.dtype, channels_last)
            self.wide_cast = _Workspace(x, c, conv_dtype, channels_last) if cast else None
            self.mid = _Workspace(x, out_channels, conv_dtype, channels_last)
            return
        self.samples = _samples(x)
        part = x[:self.samples]
        self.part = _Workspace(part, c, x.dtype, channels_last)
        self.part_grad = _Workspace(part, c, x.dtype, channels_last)
        self.part_cast = _Workspace(part, c, conv_dtype, channels_last) if cast else None


def _drop_rate(transition: nn.Module) -> float:
    drop = getattr(transition, "drop", None)
    return float(drop.p) if drop is not None and drop.training and drop.p > 0 else 0.0


class _Transition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, transition, private_input, x, bn_weight, bn_bias, conv_weight):
        norm, conv_dtype = transition.norm, _autocast_dtype(x.device.type, x.dtype)
        channels_last = channels_last_format(x) is not None
        p = _drop_rate(transition)
        with _no_autocast(x.device.type):
            mean, var = batch_mean_var(x)
            update_running_stats(norm, mean, var, x.numel() // x.shape[1])
            ws = _TransitionWorkspaces(x, transition.conv.out_channels, conv_dtype, channels_last, backward=False)
            mid = _pointwise_forward(x, norm, bn_weight, bn_bias, mean, var, conv_weight, conv_dtype, ws,
                                     channels_last)
            mask = _dropout_(mid, p) if p > 0 else None
            out = transition.pool(mid)
            del mid, ws
        ctx.transition, ctx.conv_dtype, ctx.channels_last, ctx.p = transition, conv_dtype, channels_last, p
        ctx.private_input = private_input
        ctx.save_for_backward(x, mean, var, mask, bn_weight, bn_bias, conv_weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mean, var, mask, bn_weight, bn_bias, conv_weight = ctx.saved_tensors
        transition = ctx.transition
        n, _, *spatial = x.shape
        with _no_autocast(x.device.type):
            g = _avg_pool_backward(grad_out, (n, transition.conv.out_channels, *spatial),
                                   _tuple(transition.pool.kernel_size, len(spatial)))
            g = _undrop(g, mask, ctx.p)
            grad_x = torch.zeros_like(x)
            ws = _TransitionWorkspaces(x, transition.conv.out_channels, ctx.conv_dtype, ctx.channels_last,
                                       backward=True)
            grad_w, grad_bn_weight, grad_bn_bias = _pointwise_backward(
                g, x, transition.norm, bn_weight, bn_bias, mean, var, True, conv_weight, ctx.conv_dtype, grad_x,
                ws, ctx.channels_last)
        if ctx.private_input:
            hand_over(grad_x)
        return None, None, grad_x, grad_bn_weight, grad_bn_bias, grad_w


def _avg_pool_backward(grad: Tensor, shape: tuple[int, ...], kernel: tuple[int, ...]) -> Tensor:
    """The gradient of a non-overlapping average pool (window ``kernel``, as stride, no padding) over maps of
    ``shape``: each output's gradient divided by the window's size, in each place of its window, as torch's
    kernel computes it; the places no window covers (an odd side's last row) get zero."""
    out = grad.new_zeros(shape)
    region = out[(slice(None), slice(None), *(slice(0, o * k) for o, k in zip(grad.shape[2:], kernel, strict=True)))]
    src = grad / math.prod(kernel)
    for i, (o, k) in enumerate(zip(grad.shape[2:], kernel, strict=True)):
        region = region.unflatten(2 + 2 * i, (o, k))
        src = src.unsqueeze(3 + 2 * i)
    region.copy_(src.expand_as(region))
    return out
