"""The standard dense block without repeated concatenation or repeated BN statistics: ``block_impl="concat_free"``
(models/densenet.py), which ``densenet train`` picks for eager fp32 NCHW training (training/fast.py).

torchvision's dense layer l concatenates all l earlier maps (a fresh copy, O(L^2) data per block) and its
BN1 recomputes the batch mean and variance of every channel, though a channel's statistics never change
once it is written. Here

- the block's maps are written once into one buffer (N, C_in + L*k, H, W); layer l's BN1 reads the view
  ``buffer[:, :C_in + l*k]`` (``models/block_buffer.py``, shared with the memory-efficient block);
- each channel's batch mean and variance are computed once, after it enters the buffer; BN1 then applies
  them as BN's transform, with ReLU applied in place on its output;
- the backward pass is torch's own fused BN backward (``native_batch_norm_backward`` in training mode, so
  the gradient through the batch statistics is exactly BN's), and hands each earlier map its slice.

Unlike the memory-efficient mode (models/efficient.py) nothing is recomputed: BN1-ReLU outputs are kept, as
in torchvision, for speed. Parameters, running statistics, outputs and gradients equal the plain layer's.

The tensors of the block's growing width (C_in + l*k channels at layer l) are not allocated one per layer
(see _BlockStorage): the BN1-ReLU outputs the layers keep go into one storage per block, and in the backward
pass every layer's input gradient is added into one gradient buffer for the whole block, with the ReLU's
gradient in one workspace. Allocated and freed per layer, each larger than the last in the forward pass,
they left glibc's default allocator (heap below its dynamic mmap threshold, up to 32 MB) with freed chunks
it could not reuse nor return: over two SGD steps the process's peak RSS stood 20% above its live tensors,
now 9% (DenseNet-BC-250 k=24, batch 16; docs/memory.md).

Maps are (N, C, *spatial) with one, two or three spatial dimensions (signals, images, volumes); (N, c, H, W)
below stands for any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from densenet.models.block_buffer import BlockBuffer, batch_norm_backward, normalize_relu, update_running_stats

# The blocks and layers are models/densenet.py's DenseBlock (a ModuleDict of DenseLayers) and DenseLayer; that
# module imports this one, so they are typed here as the torch classes they derive from (no import cycle).

aten = torch.ops.aten


# torch.compile runs the block eagerly between the compiled pieces of the model, as it runs the memory-efficient
# block: inductor would not keep the buffer or the shared storage, which are what the block is for.
@torch.compiler.disable
def concat_free_block_forward(block: nn.ModuleDict, x: Tensor) -> Tensor:
    """The output of ``block`` (all its maps, concatenated) for input ``x``, through one block buffer."""
    layers = list(block.values())
    buffer = BlockBuffer(x, block.out_channels)
    # A replaced norm (folded, frozen...) runs the plain layer, whose gradients autograd adds up itself: the
    # block's shared storage only when every layer reads the buffer. Without autograd (evaluation) nothing is
    # kept for a backward pass, so each BN1-ReLU output is a temporary freed after its layer.
    shared = torch.is_grad_enabled() and all(type(_first_bn(layer)) in _BATCH_NORMS for layer in layers)
    storage = _BlockStorage(buffer.data, [layer.in_channels for layer in layers]) if shared else None
    features = [x]
    for layer in layers:
        features.append(_layer_forward(layer, features, buffer, storage))
    if storage is not None:  # its pieces keep it as long as autograd keeps them (or packs them, as checkpointing does)
        storage.outputs = None
    return _BlockOutput.apply(buffer, storage, *features)


# The batch norms the buffer's BN-ReLU computes as they do (a subclass may not: folded, frozen...).
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _first_bn(layer: nn.Module) -> nn.Module:
    return layer.norm1 if layer.bottleneck else layer.norm2


def _layer_forward(layer: nn.Module, maps: Sequence[Tensor], buffer: BlockBuffer,
                   storage: _BlockStorage | None) -> Tensor:
    """``layer(maps)``, with the concatenation and the first BN-ReLU read from the buffer."""
    first_bn = _first_bn(layer)
    if type(first_bn) not in _BATCH_NORMS:  # a replaced norm (folded, frozen...): the plain layer
        return layer(maps)
    y = _ConcatBatchNormReLU.apply(buffer, storage, first_bn, first_bn.weight, first_bn.bias, *maps)
    if layer.bottleneck:
        y = layer.relu2(layer.norm2(layer.dropout(layer.conv1(y))))
    return layer.dropout(layer.conv2(y))


class _BlockStorage:
    """What a block allocates once per pass instead of once per layer: the tensors of its growing width.

    - forward: ``outputs``, one flat storage for every layer's BN1-ReLU output (kept for the backward pass,
      as the plain layer keeps it), each a contiguous (N, c, H, W) piece of it. The pieces are tensors of their
      own over the shared storage (_alias), not views, so that each keeps its own version counter;
    - backward: ``grad``, the gradient of the block's output (N, C_in + L*k, H, W), into which each layer adds
      its input gradient in place; a map's slice of it is complete once the layer after it has added its
      part, and only then handed to autograd (_ConcatBatchNormReLU.backward); ``work``, for the ReLU's
      gradient at the widest layer, reused by every narrower one.

    Each layer's input gradient from BN's backward kernel (and the 1x1 convolution's input gradient) is still
    a fresh tensor of the layer's width, freed at once.
    """

    def __init__(self, like: Tensor, widths: list[int]) -> None:
        n, _, *spatial = like.shape
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device  # the block output's
        self.plane, self.widest = n * math.prod(spatial), max(widths, default=0)
        self.outputs: Tensor | None = torch.empty(self.plane * sum(widths), dtype=self.dtype, device=self.device)
        self.offset = 0
        self.grad: Tensor | None = None
        self.work: Tensor | None = None

    def next_output(self, x: Tensor) -> Tensor:
        """The next piece of ``outputs``, shaped like ``x`` (N, c, H, W) and contiguous."""
        size = x.numel()
        out = _alias(self.outputs[self.offset:self.offset + size].view(x.shape))
        self.offset += size
        return out

    def workspace(self, like: Tensor) -> Tensor:
        """A contiguous (N, c, H, W) view of the backward workspace, for ``like``'s shape and dtype."""
        if self.work is None or self.work.dtype != like.dtype:
            self.work = torch.empty(self.plane * self.widest, dtype=like.dtype, device=like.device)
        return self.work[: like.numel()].view(like.shape)

    def release(self) -> None:
        """The block's backward pass is done: drop the gradient buffer and the workspace."""
        self.grad = self.work = None


def _alias(t: Tensor) -> Tensor:
    """``t``'s elements as a tensor of its own (not a view), with its own version counter.

    What the layers keep of the block buffer: later layers write their maps into other channels of the same
    storage, which would trip autograd's version check on a view, though the channels read here never change.
    Saved through save_for_backward, autograd frees it after the backward pass, or keeps it for the next
    (retain_graph).
    """
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class _ConcatBatchNormReLU(torch.autograd.Function):
    """ReLU(BN(cat(maps))) read from the block buffer; gradients go back to each map as a slice."""

    @staticmethod
    def forward(ctx, buffer: BlockBuffer, storage: _BlockStorage | None, bn: _BatchNorm, weight, bias, *maps):
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
        if storage is None:
            y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, bn.eps, False).relu_()
        else:
            y = normalize_relu(x, bn, weight, bias, mean, var, out=storage.next_output(x))
        ctx.sizes, ctx.eps, ctx.batch_stats, ctx.storage = buffer.sizes[:], bn.eps, batch_stats, storage
        ctx.save_for_backward(_alias(x), y, weight, bias, mean, var)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, y, weight, bias, mean, var = ctx.saved_tensors
        storage = ctx.storage
        if storage is None:
            g = aten.threshold_backward(grad_y, y, 0)
        else:
            g = aten.threshold_backward.grad_input(grad_y, y, 0, grad_input=storage.workspace(y))
        mask = [True, weight is not None and ctx.needs_input_grad[3], bias is not None and ctx.needs_input_grad[4]]
        grad_x, grad_w, grad_b = batch_norm_backward(g, x, weight, mean, var, ctx.eps, ctx.batch_stats, mask)
        del x, g
        if storage is None:
            return (None, None, None, grad_w, grad_b, *grad_x.split(ctx.sizes, dim=1))
        # Added into the block's gradient; the newest map's slice is now complete (no earlier layer reads that
        # map) and goes back to it; the other maps get theirs from the layers before.
        c, newest = grad_x.shape[1], ctx.sizes[-1]
        if storage.grad is None:  # the block's output is not in the loss, only this layer's map (caught by a hook)
            storage.grad = torch.zeros(storage.shape, dtype=storage.dtype, device=storage.device)
        grad = storage.grad
        grad[:, :c] += grad_x
        del grad_x
        if len(ctx.sizes) == 1:  # the block's first layer: the last of its backward pass
            storage.release()
        return (None, None, None, grad_w, grad_b, *([None] * (len(ctx.sizes) - 1)), grad[:, c - newest:c])


class _BlockOutput(torch.autograd.Function):
    """cat(maps) as the block buffer itself (no copy); the gradient goes back to each map as a slice."""

    @staticmethod
    def forward(ctx, buffer: BlockBuffer, storage: _BlockStorage | None, *maps):
        buffer.append(maps)
        ctx.sizes, ctx.storage = buffer.sizes[:], storage
        return buffer.data

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        storage = ctx.storage
        if storage is None:
            return (None, None, *grad.split(ctx.sizes, dim=1))
        # The block's gradient buffer (a copy: ``grad`` may be the caller's); only the last map's slice is
        # complete already, the layers add the rest in.
        storage.grad = grad.clone(memory_format=torch.contiguous_format)
        newest = ctx.sizes[-1]
        return (None, None, *([None] * (len(ctx.sizes) - 1)), storage.grad[:, -newest:])
