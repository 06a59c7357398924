"""The memory-efficient dense block: one shared buffer, BN-ReLU recomputed in the backward pass.

The standard block keeps, for every layer l, the concatenation of the l earlier feature maps and its
BN-ReLU output: memory quadratic in depth (Pleiss et al., "Memory-Efficient Implementation of
DenseNets", 2017). Here instead

- the block's maps live in ONE preallocated buffer (N, C_in + L*k, H, W); layer l reads the view
  ``buffer[:, :C_in + l*k]`` and writes its k new maps into the next k channels: no concatenation copies;
- the BN-ReLU outputs that feed each convolution are not stored: the backward pass recomputes them
  (two cheap element-wise passes) from the buffer and from the saved batch mean and 1/std;
- what is stored per layer is linear in depth: the bottleneck's 1x1-convolution output (4k maps, as in
  the technical report, whose shared storage covers the concatenation and the BN outputs), the dropout
  masks (bool) and per-channel statistics;
- nothing of the block's growing width is allocated per layer (see _Workspace): the BN-ReLU outputs, in
  the forward pass and recomputed in the backward pass, and their gradients go into workspaces allocated
  once per block and pass, sized for the widest layer. Torch's kernels would return a new tensor of
  (N, C_in + l*k, H, W) at every layer l; glibc's default allocator cannot reuse the freed smaller ones
  for the next larger one and keeps them, so a user's process grew to 39% of the standard mode's peak
  instead of the ~21% its live tensors need. In DenseNet-BC blocks the backward pass of the first BN-ReLU
  and 1x1 convolution runs one sample at a time (_pointwise_first_backward), so the recomputed BN-ReLU
  output and its gradient need one-sample workspaces only.

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
Same modules, same parameters, same state dict as the standard mode: only DenseBlock.forward differs.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from densenet.errors import DenseNetError
from densenet.models.block_buffer import BlockBuffer, batch_mean_var, update_running_stats

if TYPE_CHECKING:
    from densenet.models.densenet import DenseBlock, DenseLayer

aten = torch.ops.aten


def efficient_block_forward(block: DenseBlock, x: Tensor) -> Tensor:
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


def _layer_params(layer: DenseLayer) -> list[Tensor | None]:
    names = ("norm1", "conv1", "norm2", "conv2") if layer.bottleneck else ("norm2", "conv2")
    out: list[Tensor | None] = []
    for name in names:
        module = getattr(layer, name)
        out.extend([module.weight, module.bias] if isinstance(module, nn.BatchNorm2d) else [module.weight])
    return out


def _check_layer(layer: DenseLayer) -> None:
    convs = [layer.conv2] + ([layer.conv1] if layer.bottleneck else [])
    if any(conv.bias is not None or conv.groups != 1 for conv in convs):
        raise DenseNetError("memory_efficient=True supports the paper's dense layers only (bias-free, ungrouped "
                            "convolutions); set model.memory_efficient = False for this model")


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
        return (None, grad_x.to(ctx.x_dtype), *grad_params)


# --- forward -----------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the convolutions compute in: autocast's lower precision when it is on, else the input's."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _normalize_relu(x: Tensor, bn: nn.BatchNorm2d, weight, bias, mean: Tensor, var: Tensor,
                    out: Tensor) -> Tensor:
    """ReLU(BN(x)) with the given statistics (batch or running), written into ``out`` (a workspace view).

    BN's inference transform as ATen computes it on the CPU: alpha = weight / sqrt(var + eps),
    beta = bias - mean * alpha, y = x * alpha + beta; then ReLU in place. No tensor of x's size is allocated.
    """
    invstd = (var + bn.eps).sqrt().reciprocal()
    alpha = invstd if weight is None else invstd * weight
    beta = -mean * alpha if bias is None else bias - mean * alpha
    torch.addcmul(_per_channel(beta), x, _per_channel(alpha), out=out)
    return out.relu_()


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class _Workspace:
    """One flat storage, allocated once per dense block and pass, that every layer reuses.

    The recomputed (or forward) BN-ReLU outputs and their gradients grow by k channels per layer. Allocated
    fresh at every layer (as torch's kernels do), the freed temporaries of growing size cannot be reused by
    the next, larger one; glibc's default allocator (heap below its dynamic mmap threshold, up to 32 MB)
    keeps them, and the process's RSS grows far beyond the live tensors. This is the "shared storage" of
    Pleiss et al. (2017): storage sized once for the largest layer, of which each layer takes a contiguous
    prefix, viewed as (N, c, H, W) -- or as channels_last, matching the block's buffer.
    """

    def __init__(self, like: Tensor, channels: int, dtype: torch.dtype, channels_last: bool) -> None:
        n, _, h, w = like.shape
        self.shape = (n, h, w)
        self.channels_last = channels_last
        self.storage = torch.empty(n * channels * h * w, dtype=dtype, device=like.device)

    @classmethod
    def per_sample(cls, like: Tensor, channels: int, dtype: torch.dtype, channels_last: bool) -> _Workspace:
        return cls(like[:1], channels, dtype, channels_last)

    def view(self, channels: int) -> Tensor:
        n, h, w = self.shape
        flat = self.storage[: n * channels * h * w]
        if self.channels_last:
            return flat.view(n, h, w, channels).permute(0, 3, 1, 2)
        return flat.view(n, channels, h, w)


def _cast_into(t: Tensor, dtype: torch.dtype, ws: _Workspace | None) -> Tensor:
    """``t`` in the convolution dtype: itself, or a copy in the cast workspace (under autocast)."""
    if t.dtype == dtype or ws is None:
        return t.to(dtype)
    return ws.view(t.shape[1]).copy_(t)


def _dropout(t: Tensor, p: float) -> tuple[Tensor, Tensor]:
    # The draws of F.dropout on CPU (empty_like + bernoulli_, then multiply), so that a seeded run gives the
    # standard mode's masks; the mask is kept as bool (1 byte) for the backward pass.
    noise = torch.empty_like(t).bernoulli_(1 - p)
    mask = noise.bool()
    return t * noise.div_(1 - p), mask


def _conv(x: Tensor, weight: Tensor, conv: nn.Conv2d, dtype: torch.dtype) -> Tensor:
    return F.conv2d(x.to(dtype), weight.to(dtype), None, conv.stride, conv.padding, conv.dilation)


def _forward(layers, x: Tensor, params: list, save: bool):
    device_type = x.device.type
    conv_dtype = _autocast_dtype(device_type, x.dtype)
    n, c_in, h, w = x.shape
    growth = layers[0].conv2.out_channels
    block = BlockBuffer(x, c_in + len(layers) * growth, dtype=torch.promote_types(x.dtype, conv_dtype))
    block.write(x)
    buffer, channels_last = block.data, block.channels_last
    count = n * h * w
    ws, cast_ws = _workspaces(layers, buffer, c_in, growth, conv_dtype, channels_last)
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
            y = _normalize_relu(buffer[:, :c], first, lp[0], lp[1], mean, var, ws.view(c))
            record: list[Tensor | None] = [mean, var]
            if layer.bottleneck:
                mid = _conv(_cast_into(y, conv_dtype, cast_ws), lp[2], layer.conv1, conv_dtype)
                del y
                mask1 = None
                if layer.drop_rate > 0 and layer.training:
                    mid, mask1 = _dropout(mid, layer.drop_rate)
                if second_batch:
                    mean2, var2 = batch_mean_var(mid)
                    update_running_stats(layer.norm2, mean2, var2, count)
                else:
                    mean2, var2 = layer.norm2.running_mean, layer.norm2.running_var
                y = _normalize_relu(mid, layer.norm2, lp[3], lp[4], mean2, var2, ws.view(mid.shape[1]))
                record += [mid, mask1, mean2, var2]
            new = _conv(_cast_into(y, conv_dtype, cast_ws), lp[-1], layer.conv2, conv_dtype)
            del y
            mask2 = None
            if layer.drop_rate > 0 and layer.training:
                new, mask2 = _dropout(new, layer.drop_rate)
            record.append(mask2)
            block.write(new)
            del new
            c += growth
            if save:
                saved.extend(record)
    del ws, cast_ws
    meta = dict(conv_dtype=conv_dtype, c_in=c_in, growth=growth, batch_stats=batch_stats,
                channels_last=channels_last)
    return buffer, dict(tensors=saved, meta=meta)


def _workspaces(layers, buffer: Tensor, c_in: int, growth: int, conv_dtype: torch.dtype, channels_last: bool):
    """The block's workspace (buffer dtype) and, under autocast, a second one for the conv-dtype copies."""
    widest = c_in + (len(layers) - 1) * growth
    if layers[0].bottleneck:
        widest = max(widest, layers[0].conv1.out_channels)
    ws = _Workspace(buffer, widest, buffer.dtype, channels_last)
    cast_ws = None if conv_dtype == buffer.dtype else _Workspace(buffer, widest, conv_dtype, channels_last)
    return ws, cast_ws


# --- backward ----------------------------------------------------------------------------------------


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()


def _undrop(grad: Tensor, mask: Tensor | None, p: float) -> Tensor:
    # Exactly the standard mode's gradient through input * (mask / (1 - p)).
    return grad if mask is None else grad * mask.to(grad.dtype).div_(1 - p)


def _bn_backward_(grad: Tensor, inp: Tensor, bn: nn.BatchNorm2d, weight, mean: Tensor, var: Tensor, batch: bool,
                  scratch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BN's backward pass in place: ``grad`` (a workspace view) becomes the input gradient.

    ATen's CPU formulas (batch_norm_backward_cpu_template): with xmu = x - mean and dotp = sum(dy * xmu),
    training: dx = (dy - sum(dy)/M - xmu * dotp * invstd^2 / M) * invstd * weight; running statistics:
    dx = dy * invstd * weight; grad_weight = dotp * invstd, grad_bias = sum(dy). ``scratch`` (the other
    workspace view, free by then) holds xmu, so nothing of the input's size is allocated.
    """
    dims = (0, 2, 3)
    invstd = (var + bn.eps).sqrt().reciprocal()
    sum_dy = grad.sum(dims, dtype=mean.dtype)
    torch.sub(inp, _per_channel(mean), out=scratch)
    dotp = scratch.mul_(grad).sum(dims, dtype=mean.dtype)
    scale = invstd if weight is None else invstd * weight
    if batch:
        count = grad.numel() // grad.shape[1]
        torch.sub(inp, _per_channel(mean), out=scratch)
        scratch.mul_(_per_channel(dotp * invstd * invstd / count))
        grad.sub_(_per_channel(sum_dy / count)).sub_(scratch)
    grad.mul_(_per_channel(scale))
    grad_weight = None if weight is None else (dotp * invstd).to(weight.dtype)
    return grad, grad_weight, sum_dy


def _bn_backward(grad: Tensor, inp: Tensor, bn: nn.BatchNorm2d, weight, bias, mean: Tensor, var: Tensor,
                 batch: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    mask = [True, weight is not None, bias is not None]
    if batch:
        invstd = torch.rsqrt(var + bn.eps)
        return aten.native_batch_norm_backward(grad, inp, weight, None, None, mean, invstd, True, bn.eps, mask)
    return aten.native_batch_norm_backward(grad, inp, weight, mean, var, None, None, False, bn.eps, mask)


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, conv: nn.Conv2d, dtype: torch.dtype):
    grad_in, grad_w, _ = aten.convolution_backward(
        grad.to(dtype), inp.to(dtype), weight.to(dtype), None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0, 0], 1, [True, True, False])
    return grad_in, grad_w.to(weight.dtype)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def _pointwise_first_backward(g: Tensor, inp: Tensor, bn: nn.BatchNorm2d, bn_weight, bn_bias, mean: Tensor,
                              var: Tensor, batch: bool, weight: Tensor, dtype: torch.dtype, grad: Tensor,
                              sample: _Workspace, sample_grad: _Workspace, sample_cast: _Workspace | None,
                              channels_last: bool):
    """The backward pass of conv1x1(ReLU(BN(x))) over the block's c maps, one sample at a time.

    ``g`` is the gradient of the 1x1 convolution's output. The recomputed BN-ReLU output is needed only
    sample by sample (for the weight gradient, the ReLU mask, BN's x - mean), so it lives in a ONE-SAMPLE
    workspace: the full-batch copy the report's shared storage would hold is never materialized. So does
    the BN-ReLU's input gradient gy: BN's input gradient, (gy - sum(gy)/M - (x - mean) * k) * invstd * weight
    (ATen's CPU formulas, see _bn_backward_), is linear in gy, so each sample's gy * invstd * weight goes
    into the block gradient ``grad[:, :c]`` at once, and the batch-statistics terms follow in a second pass
    over the samples, once the batch sums are known.
    Returns the gradients of the convolution weight, the BN weight and the BN bias.
    """
    n, c = inp.shape[:2]
    acc = mean.dtype
    invstd = (var + bn.eps).sqrt().reciprocal()
    alpha = invstd if bn_weight is None else invstd * bn_weight
    beta = -mean * alpha if bn_bias is None else bn_bias - mean * alpha
    alpha3, beta3, mean3 = alpha.view(-1, 1, 1), beta.view(-1, 1, 1), mean.view(-1, 1, 1)
    w2 = weight.to(dtype).flatten(1)  # (k_out, c)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = g.to(dtype).contiguous(memory_format=fmt)
    y = sample.view(c)[0]
    y_c = y if sample_cast is None else sample_cast.view(c)[0]
    gy = sample_grad.view(c)[0]
    scale3 = (invstd if bn_weight is None else invstd * bn_weight).view(-1, 1, 1)

    def matrix(t: Tensor) -> Tensor:  # one sample's (channels, H, W) as a matrix over its memory layout
        return t.permute(1, 2, 0).reshape(-1, t.shape[0]) if channels_last else t.reshape(t.shape[0], -1)

    grad_w = None
    sum_dy = torch.zeros(c, dtype=acc, device=inp.device)
    dotp = torch.zeros(c, dtype=acc, device=inp.device)
    for i in range(n):
        torch.addcmul(beta3, inp[i], alpha3, out=y).relu_()
        if sample_cast is not None:
            y_c.copy_(y)
        g2, y2, gy2 = matrix(g[i]), matrix(y_c), matrix(gy)
        out = gy2 if sample_cast is None else y2  # under autocast: y_c is free once grad_w has it
        if channels_last:  # rows: pixels
            grad_w = torch.mm(g2.t(), y2) if grad_w is None else grad_w.addmm_(g2.t(), y2)
            torch.mm(g2, w2, out=out)
        else:  # rows: channels
            grad_w = torch.mm(g2, y2.t()) if grad_w is None else grad_w.addmm_(g2, y2.t())
            torch.mm(w2.t(), g2, out=out)
        if sample_cast is not None:
            gy2.copy_(out)
        aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
        sum_dy += gy.sum((1, 2), dtype=acc)
        torch.sub(inp[i], mean3, out=y)
        dotp += y.mul_(gy).sum((1, 2), dtype=acc)
        grad[i, :c].addcmul_(gy, scale3)
    if batch:
        count = n * inp.shape[2] * inp.shape[3]
        k3, mean_dy3 = (dotp * invstd * invstd / count).view(-1, 1, 1), (sum_dy / count).view(-1, 1, 1)
        for i in range(n):
            torch.sub(inp[i], mean3, out=y).mul_(k3).add_(mean_dy3)
            grad[i, :c].addcmul_(y, scale3, value=-1)
    grad_bn_weight = None if bn_weight is None else (dotp * invstd).to(bn_weight.dtype)
    grad_bn_bias = None if bn_bias is None else sum_dy.to(bn_bias.dtype)
    return grad_w.view_as(weight).to(weight.dtype), grad_bn_weight, grad_bn_bias


def _backward(layers, buffer: Tensor, params, tensors, meta: dict, grad_out: Tensor):
    conv_dtype, c_in, growth = meta["conv_dtype"], meta["c_in"], meta["growth"]
    channels_last = meta["channels_last"]
    grad = grad_out.to(buffer.dtype).clone(memory_format=torch.preserve_format)
    grad_params: list[Tensor | None] = [None] * len(params)
    # The block's workspaces (see _Workspace). Where every first convolution is 1x1 (DenseNet-BC): one sample
    # of the block's width for the recomputed first BN-ReLU output, one for its gradient, and the full batch
    # of the bottleneck's width for the second BN-ReLU. Else the full batch of the block's width for the
    # BN-ReLU outputs (then BN's scratch) and for their gradients. Under autocast, the same for conv copies.
    ws_y, cast_ws = _workspaces(layers, buffer, c_in, growth, conv_dtype, channels_last)
    widest = ws_y.storage.numel() // (buffer.shape[0] * buffer.shape[2] * buffer.shape[3])
    pointwise = all(layer.bottleneck and _is_pointwise(layer.conv1) for layer in layers)
    if not pointwise:
        ws_g = _Workspace(buffer, widest, buffer.dtype, channels_last)
    else:
        bottleneck = layers[0].conv1.out_channels
        ws_y = _Workspace(buffer, bottleneck, buffer.dtype, channels_last)
        sample = _Workspace.per_sample(buffer, widest, buffer.dtype, channels_last)
        sample_grad = _Workspace.per_sample(buffer, widest, buffer.dtype, channels_last)
        sample_cast = (None if conv_dtype == buffer.dtype else
                       _Workspace.per_sample(buffer, widest, conv_dtype, channels_last))
    # Where each layer's parameters and saved tensors start, in forward order.
    starts, p, t = [], 0, 0
    for layer in layers:
        starts.append((p, t))
        p += 6 if layer.bottleneck else 3
        t += 7 if layer.bottleneck else 3
    with _no_autocast(buffer.device.type):
        for index in reversed(range(len(layers))):
            layer, (p, t) = layers[index], starts[index]
            first_batch, second_batch = meta["batch_stats"][index]
            c = c_in + index * growth
            lp = params[p:p + (6 if layer.bottleneck else 3)]
            record = tensors[t:t + (7 if layer.bottleneck else 3)]
            mean, var, mask2 = record[0], record[1], record[-1]
            inp = buffer[:, :c]
            g = _undrop(grad[:, c:c + growth], mask2, layer.drop_rate)
            # conv2's input, recomputed: ReLU(BN2(bottleneck output)), or ReLU(BN(block maps)) in a basic layer.
            if layer.bottleneck:
                mid, mask1, mean2, var2 = record[2:6]
                y = _normalize_relu(mid, layer.norm2, lp[3], lp[4], mean2, var2, ws_y.view(mid.shape[1]))
                g, grad_params[p + len(lp) - 1] = _conv_backward(g, y, lp[-1], layer.conv2, conv_dtype)
                g = aten.threshold_backward(g.to(y.dtype), y, 0)
                del y
                g, grad_params[p + 3], grad_params[p + 4] = _bn_backward(
                    g, mid, layer.norm2, lp[3], lp[4], mean2, var2, second_batch)
                g = _undrop(g, mask1, layer.drop_rate)
                first_bn, conv, weight = layer.norm1, layer.conv1, lp[2]
                w_index = p + 2
            else:
                first_bn, conv, weight = layer.norm2, layer.conv2, lp[-1]
                w_index = p + len(lp) - 1
            # The first BN-ReLU over the block's c maps and the convolution after it: every tensor of the
            # block's width lives in the workspaces.
            if pointwise:
                grad_params[w_index], grad_params[p], grad_params[p + 1] = _pointwise_first_backward(
                    g, inp, first_bn, lp[0], lp[1], mean, var, first_batch, weight, conv_dtype, grad,
                    sample, sample_grad, sample_cast, channels_last)
                del g
                continue
            y = _normalize_relu(inp, first_bn, lp[0], lp[1], mean, var, ws_y.view(c))
            gy = ws_g.view(c)
            g_in, grad_params[w_index] = _conv_backward(g, y, weight, conv, conv_dtype)
            gy.copy_(g_in)
            del g, g_in
            aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
            gy, grad_params[p], grad_params[p + 1] = _bn_backward_(gy, inp, first_bn, lp[0], mean, var,
                                                                   first_batch, scratch=y)
            if lp[0] is None:
                grad_params[p] = None
            grad_params[p + 1] = grad_params[p + 1].to(lp[1].dtype) if lp[1] is not None else None
            grad[:, :c] += gy
            del y, gy
    return grad[:, :c_in], grad_params
