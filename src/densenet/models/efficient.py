"""The memory-efficient dense block: one shared buffer, BN-ReLU recomputed in the backward pass
(``block_impl="efficient"``, or torchvision's spelling ``memory_efficient=True``; models/densenet.py).

The standard block keeps, for every layer l, the concatenation of the l earlier feature maps and its
BN-ReLU output: memory quadratic in depth (Pleiss et al., "Memory-Efficient Implementation of
DenseNets", 2017). Here instead

- the block's maps live in ONE preallocated buffer (N, C_in + L*k, H, W); layer l reads the view
  ``buffer[:, :C_in + l*k]`` and writes its k new maps into the next k channels: no concatenation copies;
- the BN-ReLU outputs that feed each convolution are not stored, nor (in bottleneck layers) the 1x1
  convolution's output: the backward pass recomputes them from the buffer and the saved batch mean and
  variance (two element-wise passes and, for the bottleneck, the 1x1 convolution again, about a quarter
  more arithmetic per step). What is stored per layer is the dropout masks (bool) and per-channel
  statistics: besides the buffer, almost nothing. The technical report's shared storage covers the
  concatenation and the BN outputs and keeps the bottleneck's 4k maps: for DenseNet-BC-250 k=24 at batch
  16, 340 MB, a third of this mode's peak when it kept them (docs/memory.md);
- nothing of the block's growing width is allocated per layer (see _Workspace): the BN-ReLU outputs, in
  the forward pass and recomputed in the backward pass, and their gradients go into workspaces allocated
  once per block and pass, sized for the widest layer. Torch's kernels would return a new tensor of
  (N, C_in + l*k, H, W) at every layer l; glibc's default allocator cannot reuse the freed smaller ones
  for the next larger one and keeps them, so a user's process grew to 39% of the standard mode's peak
  instead of the ~21% its live tensors need. In bottleneck layers the backward pass runs a few samples at a
  time: the recomputation of the first BN-ReLU and the 1x1 convolution (_pointwise_forward) and their
  backward pass (_pointwise_backward) in two small workspaces at the block's width, and the 3x3
  convolution's backward pass with the recomputed second BN-ReLU (_second_backward), so that no tensor of
  the block's width but the buffer and its gradient, and none of the convolution kernel's temporaries, exist
  for the whole batch (DenseNet-121 on 1x64^3 volumes, batch 16: the peak of the live tensors, in the first
  block's backward pass, 649 -> 549 MB; 2026-12-06). The block accumulates its gradient into the one a
  transition hands over (hand_over: 64 MB less there) and returns its input's gradient as a copy, so that
  the gradient of its whole width is freed when its backward pass ends.

The batch statistics of a channel never change once it is written, so each channel's batch mean and
variance are computed once, when it enters the buffer, and every later layer's BN1 reuses them (the
standard mode recomputes them over the whole concatenation in every layer). BN running statistics are
updated exactly once per training forward; the recomputation uses the saved batch statistics and leaves
them alone (torch.utils.checkpoint based versions update them twice).

The backward pass is written out one layer at a time, accumulating into one gradient buffer: with torch's
own kernels (native_batch_norm_backward, convolution_backward) where the tensors have a constant size
(the bottleneck's), and, for the block's width, with ATen's CPU formulas written in place into the
workspaces (BN, ReLU) and matrix products with ``out=`` (the 1x1 convolution). The results equal the
standard mode's up to rounding (tests/models/test_efficient.py: float64, every gradient and BN buffer).
Same modules, same parameters, same state dict as the standard mode: only DenseBlock.forward differs (and, around
the blocks, the stem's BN-ReLU-max-pool and the transitions: efficient_stem.py).
Under torch.compile the blocks run eagerly, between the compiled stem, transitions and head.

Maps are (N, C, *spatial) with one, two or three spatial dimensions: "pixels" below are the product of the
spatial sizes (samples of a signal, pixels, voxels), and channels_last is torch.channels_last for images and
torch.channels_last_3d for volumes. Nothing here depends on the number of spatial dimensions but the shapes.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from densenet.errors import DenseNetError
from densenet.models.block_buffer import (
    BlockBuffer,
    batch_mean_var,
    bn_factors,
    normalize_relu,
    normalize_relu_,
    per_channel,
    spatial_dims_of,
    update_running_stats,
)

# The blocks and layers are models/densenet.py's DenseBlock (a ModuleDict of DenseLayers) and DenseLayer; that
# module imports this one, so they are typed here as the torch classes they derive from (no import cycle).

aten = torch.ops.aten


# torch.compile runs the block eagerly between the compiled pieces of the model (stem, transitions, head):
# inductor would not keep the shared buffer, the workspaces or the loops over parts of the batch, and the
# savings are what the mode is for.
@torch.compiler.disable
def efficient_block_forward(block: nn.ModuleDict, x: Tensor) -> Tensor:
    """The output of ``block`` for input ``x`` (all maps, concatenated), computed in one shared buffer."""
    layers = list(block.values())
    params: list[Tensor | None] = []
    for layer in layers:
        _check_layer(layer)
        params.extend(_layer_params(layer))
    tensors = [x, *(p for p in params if p is not None)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SharedBufferBlock.apply(layers, x, *params)
    with torch.no_grad():
        return _forward(layers, x, params, save=False)[0]


def _layer_params(layer: nn.Module) -> list[Tensor | None]:
    names = ("norm1", "conv1", "norm2", "conv2") if layer.bottleneck else ("norm2", "conv2")
    out: list[Tensor | None] = []
    for name in names:
        module = getattr(layer, name)
        out.extend([module.weight, module.bias] if isinstance(module, _BatchNorm) else [module.weight])
    return out


def _check_layer(layer: nn.Module) -> None:
    convs = [layer.conv2] + ([layer.conv1] if layer.bottleneck else [])
    pointwise = not layer.bottleneck or (set(layer.conv1.kernel_size) == {1} and set(layer.conv1.stride) == {1}
                                         and set(layer.conv1.padding) == {0})
    if not pointwise or any(conv.bias is not None or conv.groups != 1 for conv in convs):
        raise DenseNetError("block_impl 'efficient' supports the paper's dense layers only (bias-free, ungrouped "
                            "convolutions, a 1x1 bottleneck); call model.set_block_impl('plain') for this model")


# Gradients of a dense block's output that the node computing them allocated and handed over (hand_over): the
# block's backward pass accumulates into such a gradient in place instead of into a copy of it (a tensor of the
# block's full width, 64 MB in DenseNet-121's first block on 1x64^3 volumes at batch 16). Keyed by id, weakly.
_HANDED_OVER: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def hand_over(grad: Tensor) -> Tensor:
    """Mark ``grad``, the gradient of a dense block's output, as free to be overwritten by that block's backward
    pass; returns it. Only for a tensor the caller's backward pass allocated and that nothing else can see: the
    output of a block no module hook, callback or caller code saw (densenet.run_features decides)."""
    _HANDED_OVER[id(grad)] = grad
    return grad


def _accumulator(grad_out: Tensor, buffer: Tensor) -> Tensor:
    """The tensor the backward pass accumulates the block's gradient in: ``grad_out`` itself if it was handed
    over (and has the buffer's dtype and layout), else a copy of it."""
    if (_HANDED_OVER.pop(id(grad_out), None) is grad_out and grad_out.dtype == buffer.dtype
            and grad_out.shape == buffer.shape and grad_out.stride() == buffer.stride()):
        return grad_out
    return grad_out.to(buffer.dtype).clone(memory_format=torch.preserve_format)


class _SharedBufferBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layers, x, *params):
        out, saved = _forward(layers, x, list(params), save=True)
        ctx.layers = layers
        ctx.meta = saved.pop("meta")
        ctx.x_dtype = x.dtype
        tensors = saved["tensors"]
        ctx.save_for_backward(out, *params, *tensors)
        ctx.num_params = len(params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        out, *rest = ctx.saved_tensors
        params, tensors = rest[: ctx.num_params], rest[ctx.num_params:]
        grad_x, grad_params = _backward(ctx.layers, out, params, tensors, ctx.meta, grad_out)
        # A copy of the input's channels, so that the gradient of the block's whole width is freed now, not
        # when the stem or transition before the block is done with its part (the first block's, 64 MB against
        # 16 MB in DenseNet-121 on 1x64^3 volumes at batch 16).
        grad_x = grad_x.to(ctx.x_dtype) if grad_x.dtype != ctx.x_dtype else grad_x.clone(
            memory_format=torch.preserve_format)
        return (None, grad_x, *grad_params)


# --- forward -----------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the convolutions compute in: autocast's lower precision when it is on, else the input's."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _uses_batch_stats(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


class _Workspace:
    """One flat storage, allocated once per dense block and pass, that every layer reuses.

    The BN-ReLU outputs of the block's maps and their gradients grow by k channels per layer. Allocated
    fresh at every layer (as torch's kernels do), the freed temporaries of growing size cannot be reused by
    the next, larger one; glibc's default allocator (heap below its dynamic mmap threshold, up to 32 MB)
    keeps them, and the process's RSS grows far beyond the live tensors. This is the "shared storage" of
    Pleiss et al. (2017): storage sized once for the largest layer, of which each layer takes a contiguous
    prefix, viewed as (N, c, *spatial) -- or as channels_last, matching the block's buffer. ``storage``: a
    part of another workspace's, free while this one is used.
    """

    def __init__(self, like: Tensor, channels: int, dtype: torch.dtype, channels_last: bool,
                 storage: Tensor | None = None) -> None:
        n, _, *spatial = like.shape
        self.shape = (n, *spatial)
        self.channels_last = channels_last
        size = n * channels * math.prod(spatial)
        self.storage = torch.empty(size, dtype=dtype, device=like.device) if storage is None else storage[:size]

    def view(self, channels: int) -> Tensor:
        n, *spatial = self.shape
        flat = self.storage[: n * channels * math.prod(spatial)]
        if self.channels_last:
            return flat.view(n, *spatial, channels).movedim(-1, 1)
        return flat.view(n, channels, *spatial)


class _Workspaces:
    """A block's workspaces for one pass (forward or backward), allocated once, before its first layer.

    ``wide``: the full batch at the block's width, for the BN-ReLU output over the block's maps (``wide_cast``:
    its conv-dtype copy under autocast); in basic layers ``grad`` holds its gradient. Bottleneck layers have
    no ``wide`` in the backward pass: the recomputation of the bottleneck output (_pointwise_forward) and its
    backward pass (_pointwise_backward) run a few samples at a time, in ``part`` and ``part_grad`` of
    ``samples`` samples each (``part_cast`` under autocast). ``mid`` (bottleneck output) and ``y`` (second
    BN-ReLU; in basic layers ``y`` is ``wide``), ``cast``: at the bottleneck's width.
    """

    def __init__(self, layers, buffer: Tensor, c_in: int, growth: int, conv_dtype: torch.dtype,
                 channels_last: bool, backward: bool) -> None:
        widest = c_in + (len(layers) - 1) * growth
        dtype, cast = buffer.dtype, conv_dtype != buffer.dtype
        bottleneck = layers[0].bottleneck
        self.wide = self.wide_cast = self.grad = self.mid = self.part = self.part_grad = self.part_cast = None
        self.samples = 0
        if not (bottleneck and backward):
            self.wide = _Workspace(buffer, widest, dtype, channels_last)
            self.wide_cast = _Workspace(buffer, widest, conv_dtype, channels_last) if cast else None
        if not bottleneck:
            self.y, self.cast = self.wide, self.wide_cast
            self.grad = _Workspace(buffer, widest, dtype, channels_last) if backward else None
            return
        width = layers[0].conv1.out_channels
        self.mid = _Workspace(buffer, width, conv_dtype, channels_last)
        self.y = _Workspace(buffer, width, dtype, channels_last)
        self.cast = _Workspace(buffer, width, conv_dtype, channels_last) if cast else None
        if backward:
            per_sample = widest * math.prod(buffer.shape[2:]) * dtype.itemsize
            self.samples = max(1, min(buffer.shape[0], _PART_BYTES // per_sample))
            part = buffer[:self.samples]
            self.part = _Workspace(part, widest, dtype, channels_last)
            self.part_grad = _Workspace(part, widest, dtype, channels_last)
            self.part_cast = _Workspace(part, widest, conv_dtype, channels_last) if cast else None
            per_sample = width * math.prod(buffer.shape[2:]) * dtype.itemsize
            self.conv_samples = max(1, min(buffer.shape[0], _CONV_PART_BYTES // per_sample))
            self.part_y = _Workspace(buffer[:self.conv_samples], width, dtype, channels_last)


# The bottleneck's backward pass (_pointwise_forward's recomputation, _pointwise_backward) takes the batch in
# parts of about this many bytes at the block's width (two such workspaces, instead of one of the full batch).
# One sample at a time, the small maps of the last blocks made each call's overhead count; and a part in
# channels_last is one (pixels, channels) matrix, one matrix product.
_PART_BYTES = 4 << 20
# ... and the backward pass of its 3x3 convolution (_second_backward) in parts of about this many bytes of the
# convolution's input: a few samples per call to the convolution kernel, whose temporaries grow with the part.
_CONV_PART_BYTES = 8 << 20


def _pointwise_forward(inp: Tensor, bn: _BatchNorm, bn_weight, bn_bias, mean: Tensor, var: Tensor,
                       weight: Tensor, dtype: torch.dtype, ws: _Workspaces, channels_last: bool) -> Tensor:
    """conv1x1(ReLU(BN(inp))) over the block's c maps, into the ``ws.mid`` workspace.

    The BN-ReLU output lives in the ``ws.wide`` workspace; the 1x1 convolution is one batched matrix product
    (faster than the convolution kernel on a CPU). The forward pass runs this, and the backward pass again
    to recompute the bottleneck output instead of keeping it (4k maps per layer: most of what the block
    would otherwise store).
    """
    n, c, *spatial = inp.shape
    w2 = weight.to(dtype).flatten(1)  # (bottleneck width, c)
    mid = ws.mid.view(w2.shape[0])
    if ws.wide is not None:
        y = normalize_relu(inp, bn, bn_weight, bn_bias, mean, var, ws.wide.view(c))
        _matmul_into(mid, _cast_into(y, dtype, ws.wide_cast), w2, channels_last)
        return mid
    # No full-batch workspace (the backward pass's recomputation, a transition's): a few samples at a time.
    factors = bn_factors(bn, bn_weight, bn_bias, mean, var, inp)
    for start in range(0, n, ws.samples):
        rows = slice(start, min(start + ws.samples, n))
        m = rows.stop - rows.start
        y = normalize_relu_(inp[rows], factors, out=ws.part.view(c)[:m])
        if ws.part_cast is not None and y.dtype != dtype:
            y = ws.part_cast.view(c)[:m].copy_(y)
        _matmul_into(mid[rows], y.to(dtype), w2, channels_last)
    return mid


def _matmul_into(mid: Tensor, y: Tensor, w2: Tensor, channels_last: bool) -> None:
    """The 1x1 convolution of ``y`` (n, c, *spatial) with the (width, c) matrix ``w2``, written into ``mid``."""
    n, c, *spatial = y.shape
    pixels = math.prod(spatial)
    if channels_last:  # (n, pixels, c) @ (c, width)
        torch.matmul(y.movedim(1, -1).reshape(n, pixels, c), w2.t(), out=mid.movedim(1, -1).view(n, pixels, -1))
    else:  # (width, c) @ (n, c, pixels)
        torch.matmul(w2, y.reshape(n, c, pixels), out=mid.view(n, -1, pixels))


def _cast_into(t: Tensor, dtype: torch.dtype, ws: _Workspace | None) -> Tensor:
    """``t`` in the convolution dtype: itself, or a copy in the cast workspace (under autocast)."""
    if t.dtype == dtype or ws is None:
        return t.to(dtype)
    return ws.view(t.shape[1]).copy_(t)


def _dropout_(t: Tensor, p: float) -> Tensor:
    """F.dropout on ``t`` in place; returns the mask (bool, 1 byte), all _redrop_ needs to apply it again.

    Not DenseLayer.dropout (which the other two blocks share): this block keeps neither the convolution's
    output nor F.dropout's float mask, and the backward pass applies the same mask again to the recomputed maps.

    The draws of F.dropout on CPU (empty_like + bernoulli_, then input * noise / (1 - p)), so that a seeded run
    gives the standard mode's masks and values.
    """
    noise = torch.empty_like(t).bernoulli_(1 - p)
    mask = noise.bool()
    t.mul_(noise.div_(1 - p))
    return mask


def _redrop_(t: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """The dropout of ``mask`` applied to ``t`` in place, bit for bit as _dropout_ applied it."""
    return t if mask is None else t.mul_(mask.to(t.dtype).div_(1 - p))


def _conv(x: Tensor, weight: Tensor, conv: nn.modules.conv._ConvNd, dtype: torch.dtype) -> Tensor:
    # The module's own convolution (whatever its number of spatial dimensions), with the weight in ``dtype``.
    return conv._conv_forward(x.to(dtype), weight.to(dtype), None)


def _forward(layers, x: Tensor, params: list, save: bool):
    device_type = x.device.type
    conv_dtype = _autocast_dtype(device_type, x.dtype)
    n, c_in = x.shape[:2]
    growth = layers[0].conv2.out_channels
    block = BlockBuffer(x, c_in + len(layers) * growth, dtype=torch.promote_types(x.dtype, conv_dtype))
    block.write(x)
    buffer, channels_last = block.data, block.channels_last
    count = x.numel() // c_in
    ws = _Workspaces(layers, buffer, c_in, growth, conv_dtype, channels_last, backward=False)
    batch_stats = [(_uses_batch_stats(layer.norm1 if layer.bottleneck else layer.norm2),
                    layer.bottleneck and _uses_batch_stats(layer.norm2)) for layer in layers]
    saved: list[Tensor | None] = []
    c, i = c_in, 0
    with _no_autocast(device_type):
        for layer, (first_batch, second_batch) in zip(layers, batch_stats, strict=True):
            size = 6 if layer.bottleneck else 3
            lp = params[i:i + size]
            i += size
            first = layer.norm1 if layer.bottleneck else layer.norm2
            if first_batch:  # each channel's statistics computed once, when a layer first reads it
                mean, var = block.batch_stats()
                update_running_stats(first, mean, var, count)
            else:
                mean, var = first.running_mean, first.running_var
            record: list[Tensor | None] = [mean, var]
            if layer.bottleneck:
                mid = _pointwise_forward(buffer[:, :c], first, lp[0], lp[1], mean, var, lp[2], conv_dtype, ws,
                                         channels_last)
                mask1 = _dropout_(mid, layer.drop_rate) if layer.drop_rate > 0 and layer.training else None
                if second_batch:
                    mean2, var2 = batch_mean_var(mid)
                    update_running_stats(layer.norm2, mean2, var2, count)
                else:
                    mean2, var2 = layer.norm2.running_mean, layer.norm2.running_var
                y = normalize_relu(mid, layer.norm2, lp[3], lp[4], mean2, var2, ws.y.view(mid.shape[1]))
                record += [mask1, mean2, var2]
            else:
                y = normalize_relu(buffer[:, :c], first, lp[0], lp[1], mean, var, ws.y.view(c))
            new = _conv(_cast_into(y, conv_dtype, ws.cast), lp[-1], layer.conv2, conv_dtype)
            del y
            mask2 = _dropout_(new, layer.drop_rate) if layer.drop_rate > 0 and layer.training else None
            record.append(mask2)
            block.write(new)
            del new
            c += growth
            if save:
                saved.extend(record)
    del ws
    meta = dict(conv_dtype=conv_dtype, c_in=c_in, growth=growth, batch_stats=batch_stats,
                channels_last=channels_last)
    return buffer, dict(tensors=saved, meta=meta)


# --- backward ----------------------------------------------------------------------------------------


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()


def _undrop(grad: Tensor, mask: Tensor | None, p: float) -> Tensor:
    # Exactly the standard mode's gradient through input * (mask / (1 - p)).
    return grad if mask is None else grad * mask.to(grad.dtype).div_(1 - p)


def _bn_backward_(grad: Tensor, inp: Tensor, bn: _BatchNorm, weight, mean: Tensor, var: Tensor, batch: bool,
                  scratch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BN's backward pass in place: ``grad`` (a workspace view) becomes the input gradient.

    ATen's CPU formulas (batch_norm_backward_cpu_template): with xmu = x - mean and dotp = sum(dy * xmu),
    training: dx = (dy - sum(dy)/M - xmu * dotp * invstd^2 / M) * invstd * weight; running statistics:
    dx = dy * invstd * weight; grad_weight = dotp * invstd, grad_bias = sum(dy). ``scratch`` (the other
    workspace view, free by then) holds xmu, so nothing of the input's size is allocated.
    """
    dims, nd = (0, *spatial_dims_of(grad)), grad.dim() - 2
    invstd = (var + bn.eps).sqrt().reciprocal()
    sum_dy = grad.sum(dims, dtype=mean.dtype)
    torch.sub(inp, per_channel(mean, nd), out=scratch)
    dotp = scratch.mul_(grad).sum(dims, dtype=mean.dtype)
    scale = invstd if weight is None else invstd * weight
    if batch:
        count = grad.numel() // grad.shape[1]
        torch.sub(inp, per_channel(mean, nd), out=scratch)
        scratch.mul_(per_channel(dotp * invstd * invstd / count, nd))
        grad.sub_(per_channel(sum_dy / count, nd)).sub_(scratch)
    grad.mul_(per_channel(scale, nd))
    grad_weight = None if weight is None else (dotp * invstd).to(weight.dtype)
    return grad, grad_weight, sum_dy


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, conv: nn.modules.conv._ConvNd, dtype: torch.dtype):
    grad_in, grad_w, _ = aten.convolution_backward(
        grad.to(dtype), inp.to(dtype), weight.to(dtype), None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0] * len(conv.stride), 1, [True, True, False])
    return grad_in, grad_w.to(weight.dtype)


def _pointwise_backward(g: Tensor, inp: Tensor, bn: _BatchNorm, bn_weight, bn_bias, mean: Tensor,
                        var: Tensor, batch: bool, weight: Tensor, dtype: torch.dtype, grad: Tensor,
                        ws: _Workspaces, channels_last: bool):
    """The backward pass of conv1x1(ReLU(BN(x))) over the block's c maps, a few samples at a time.

    ``g`` is the gradient of the 1x1 convolution's output. The recomputed BN-ReLU output is needed only
    part by part (for the weight gradient, the ReLU mask, BN's x - mean), so it lives in a workspace of
    ``ws.samples`` samples: the full-batch copy the report's shared storage would hold is never materialized.
    So does the BN-ReLU's input gradient gy: BN's input gradient, (gy - sum(gy)/M - (x - mean) * k) * invstd *
    weight (ATen's CPU formulas, see _bn_backward_), is linear in gy, so each part's gy * invstd * weight goes
    into the block gradient ``grad[:, :c]`` at once, and the batch-statistics terms follow in a second pass,
    once the batch sums are known.
    Returns the gradients of the convolution weight, the BN weight and the BN bias.
    """
    n, c, *spatial = inp.shape
    pixels, nd = math.prod(spatial), len(spatial)
    dims = (0, *spatial_dims_of(inp))
    acc = mean.dtype
    factors = bn_factors(bn, bn_weight, bn_bias, mean, var, inp)
    center, scale, _, invstd = factors
    center = per_channel(mean, nd) if center is None else center
    w2 = weight.to(dtype).flatten(1)  # (bottleneck width, c)
    width = w2.shape[0]
    # In channels_last, g's channels last too (movedim below is then a view); 1D maps have no such layout.
    g = g.to(dtype)
    g = g.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else g.contiguous()
    # The weight gradient sums over the batch in float32 at least: summed in bf16, part after part, it would
    # keep 8 bits of each part's sum.
    grad_w = torch.zeros(width, c, dtype=torch.promote_types(dtype, torch.float32), device=inp.device)
    sum_dy = torch.zeros(c, dtype=acc, device=inp.device)
    dotp = torch.zeros(c, dtype=acc, device=inp.device)
    for start in range(0, n, ws.samples):
        rows = slice(start, min(start + ws.samples, n))
        m = rows.stop - rows.start
        x, gm = inp[rows], g[rows]
        y, gy = ws.part.view(c)[:m], ws.part_grad.view(c)[:m]
        y_c = y if ws.part_cast is None else ws.part_cast.view(c)[:m]
        normalize_relu_(x, factors, out=y)
        if y_c is not y:
            y_c.copy_(y)
        out = gy if y_c is y else y_c  # under autocast: y_c is free once grad_w has it
        if channels_last:  # the part is one (pixels, channels) matrix: one product each
            g2 = gm.movedim(1, -1).reshape(-1, width)
            grad_w += torch.mm(g2.t(), y_c.movedim(1, -1).reshape(-1, c))
            torch.mm(g2, w2, out=out.movedim(1, -1).view(-1, c))
        else:  # one (channels, pixels) matrix per sample
            g3 = gm.reshape(m, width, pixels)
            grad_w += torch.bmm(g3, y_c.view(m, c, pixels).transpose(1, 2)).sum(0, dtype=grad_w.dtype)
            torch.matmul(w2.t(), g3, out=out.view(m, c, pixels))
        if out is not gy:
            gy.copy_(out)
        aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
        sum_dy += gy.sum(dims, dtype=acc)
        torch.sub(x, center, out=y)
        dotp += y.mul_(gy).sum(dims, dtype=acc)
        grad[rows, :c].addcmul_(gy, scale)
    # dotp is sum((x - center) * gy): with the mean rounded to the maps' dtype (bn_factors), the rounding's
    # share is exactly (mean - center) * sum_dy, taken off here.
    center_acc, scale_acc = center.flatten().to(acc), scale.flatten().to(acc)
    dotp += (center_acc - mean) * sum_dy
    if batch:  # grad -= alpha * ((x - mean) * k + sum_dy / count), as (x - center) * a + b, in the workspace
        k = dotp * invstd * invstd / (n * pixels)
        a, b = -scale_acc * k, -scale_acc * ((center_acc - mean) * k + sum_dy / (n * pixels))
        a, b = per_channel(a.to(inp.dtype), nd), per_channel(b.to(inp.dtype), nd)
        if ws.wide is not None:  # the block's workspace, free by now
            t = torch.sub(inp, center, out=ws.wide.view(c))
            grad[:, :c].addcmul_(t, a).add_(b)
        else:  # no full-batch workspace (a transition, efficient_stem.py): part by part
            for start in range(0, n, ws.samples):
                rows = slice(start, min(start + ws.samples, n))
                t = torch.sub(inp[rows], center, out=ws.part.view(c)[:rows.stop - rows.start])
                grad[rows, :c].addcmul_(t, a).add_(b)
    grad_bn_weight = None if bn_weight is None else (dotp * invstd).to(bn_weight.dtype)
    grad_bn_bias = None if bn_bias is None else sum_dy.to(bn_bias.dtype)
    return grad_w.view_as(weight).to(weight.dtype), grad_bn_weight, grad_bn_bias


def _second_backward(g: Tensor, mid: Tensor, bn: _BatchNorm, bn_weight, bn_bias, mean: Tensor, var: Tensor,
                     batch: bool, conv: nn.modules.conv._ConvNd, weight: Tensor, dtype: torch.dtype,
                     ws: _Workspaces):
    """The backward pass of conv2(ReLU(BN2(mid))) in a bottleneck layer, ``ws.conv_samples`` samples at a time.

    ``g`` is the gradient of conv2's output. Each part recomputes ReLU(BN2(.)) into ``ws.part_y`` and runs the
    3x3 convolution's backward pass on it, so neither the BN-ReLU output nor the convolution's input gradient nor
    its kernel's temporaries exist for the whole batch. BN2's input gradient goes into the ``ws.y`` workspace in
    two passes (gy * invstd * weight part by part, then the batch-sum terms; ATen's CPU formulas, see
    _bn_backward_). Returns that gradient and the gradients of the convolution weight, BN2's weight and bias.
    """
    n, width, *spatial = mid.shape
    nd, dims, acc = len(spatial), (0, *spatial_dims_of(mid)), mean.dtype
    factors = bn_factors(bn, bn_weight, bn_bias, mean, var, mid)
    center, scale, _, invstd = factors
    center = per_channel(mean, nd) if center is None else center
    out = ws.y.view(width)
    grad_w = None
    sum_dy = torch.zeros(width, dtype=acc, device=mid.device)
    dotp = torch.zeros(width, dtype=acc, device=mid.device)
    parts = [slice(start, min(start + ws.conv_samples, n)) for start in range(0, n, ws.conv_samples)]
    for rows in parts:
        y = normalize_relu_(mid[rows], factors, out=ws.part_y.view(width)[:rows.stop - rows.start])
        g_in, g_w = _conv_backward(g[rows], y, weight, conv, dtype)
        grad_w = g_w if grad_w is None else grad_w.add_(g_w)
        gy = out[rows].copy_(g_in)
        del g_in
        aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
        sum_dy += gy.sum(dims, dtype=acc)
        torch.sub(mid[rows], center, out=y)
        dotp += y.mul_(gy).sum(dims, dtype=acc)
        gy.mul_(scale)
    # As in _pointwise_backward: the share of the mean's rounding (bn_factors) in dotp.
    center_acc, scale_acc = center.flatten().to(acc), scale.flatten().to(acc)
    dotp += (center_acc - mean) * sum_dy
    if batch:
        count = n * math.prod(spatial)
        k = dotp * invstd * invstd / count
        a = per_channel((-scale_acc * k).to(out.dtype), nd)
        b = per_channel((-scale_acc * ((center_acc - mean) * k + sum_dy / count)).to(out.dtype), nd)
        for rows in parts:
            t = torch.sub(mid[rows], center, out=ws.part_y.view(width)[:rows.stop - rows.start])
            out[rows].addcmul_(t, a).add_(b)
    grad_bn_weight = None if bn_weight is None else (dotp * invstd).to(bn_weight.dtype)
    grad_bn_bias = None if bn_bias is None else sum_dy.to(bn_bias.dtype)
    return out, grad_w, grad_bn_weight, grad_bn_bias


def _backward(layers, buffer: Tensor, params, tensors, meta: dict, grad_out: Tensor):
    conv_dtype, c_in, growth = meta["conv_dtype"], meta["c_in"], meta["growth"]
    channels_last = meta["channels_last"]
    grad = _accumulator(grad_out, buffer)
    grad_params: list[Tensor | None] = [None] * len(params)
    ws = _Workspaces(layers, buffer, c_in, growth, conv_dtype, channels_last, backward=True)
    # Where each layer's parameters and saved tensors start, in forward order.
    starts, p, t = [], 0, 0
    for layer in layers:
        starts.append((p, t))
        p += 6 if layer.bottleneck else 3
        t += 6 if layer.bottleneck else 3
    with _no_autocast(buffer.device.type):
        for index in reversed(range(len(layers))):
            layer, (p, t) = layers[index], starts[index]
            first_batch, second_batch = meta["batch_stats"][index]
            c = c_in + index * growth
            lp = params[p:p + (6 if layer.bottleneck else 3)]
            record = tensors[t:t + (6 if layer.bottleneck else 3)]
            mean, var, mask2 = record[0], record[1], record[-1]
            inp = buffer[:, :c]
            g = _undrop(grad[:, c:c + growth], mask2, layer.drop_rate)
            if layer.bottleneck:
                # The bottleneck output and conv2's input ReLU(BN2(.)), recomputed into the workspaces.
                mask1, mean2, var2 = record[2:5]
                first_bn = layer.norm1
                mid = _pointwise_forward(inp, first_bn, lp[0], lp[1], mean, var, lp[2], conv_dtype, ws,
                                         channels_last)
                _redrop_(mid, mask1, layer.drop_rate)
                g, grad_params[p + 5], grad_params[p + 3], grad_params[p + 4] = _second_backward(
                    g, mid, layer.norm2, lp[3], lp[4], mean2, var2, second_batch, layer.conv2, lp[-1], conv_dtype,
                    ws)
                del mid
                g = _undrop(g, mask1, layer.drop_rate)
                grad_params[p + 2], grad_params[p], grad_params[p + 1] = _pointwise_backward(
                    g, inp, first_bn, lp[0], lp[1], mean, var, first_batch, lp[2], conv_dtype, grad, ws,
                    channels_last)
                del g
                continue
            # A basic layer: the BN-ReLU over the block's c maps and its gradient in the full-batch workspaces.
            y = normalize_relu(inp, layer.norm2, lp[0], lp[1], mean, var, ws.y.view(c))
            gy = ws.grad.view(c)
            g_in, grad_params[p + 2] = _conv_backward(g, y, lp[2], layer.conv2, conv_dtype)
            gy.copy_(g_in)
            del g, g_in
            aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
            gy, grad_params[p], grad_params[p + 1] = _bn_backward_(gy, inp, layer.norm2, lp[0], mean, var,
                                                                   first_batch, scratch=y)
            if lp[0] is None:
                grad_params[p] = None
            grad_params[p + 1] = grad_params[p + 1].to(lp[1].dtype) if lp[1] is not None else None
            grad[:, :c] += gy
            del y, gy
    return grad[:, :c_in], grad_params
