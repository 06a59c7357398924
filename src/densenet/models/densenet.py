"""The DenseNet of Huang et al. (CVPR 2017): dense layer, dense block, transition, and the network.

One class builds every network of the paper: the CIFAR/SVHN form (one 3x3 stem convolution, three
blocks) and the ImageNet form (7x7 stride-2 stem, max-pool, four blocks), basic or bottleneck layers,
any compression. Module names follow torchvision (``features.denseblock1.denselayer1.norm1``, ...,
``features.norm5``, ``classifier``) so torchvision's ImageNet state dicts load as they are.

    >>> import densenet
    >>> model = densenet.create_model("densenet_bc100_k12")

How a dense block computes its output is one visible setting, ``block_impl`` (BLOCK_IMPLS), stored on every
``DenseBlock`` and set for a whole model by ``DenseNet(block_impl=...)``, ``create_model(..., block_impl=...)`` or
``model.set_block_impl(...)``; it shows in ``repr(model)``. All three give the same outputs, gradients,
running statistics and state dict (tests/models/test_block_impl.py, float64, against "plain"):

- ``"plain"`` (the default): each layer concatenates the earlier maps with ``torch.cat``, as torchvision
  does. What tracing, exporting and torch.compile should see, and the fastest under autocast and in
  channels_last (docs/benchmarks.md).
- ``"concat_free"`` (concat_free.py): each map written once into one block buffer, each channel's batch
  statistics computed once. Less training memory in eager fp32 NCHW (``densenet bench memory``: peak RSS
  over two SGD steps of DenseNet-BC-100 k=12, batch 16, 448 MB against torchvision's 692 MB, 2026-12-06),
  which is where ``densenet train`` picks it (training/fast.py).
- ``"efficient"`` (efficient.py; ``memory_efficient=True`` is torchvision's spelling of it): the shared
  buffer with the BN-ReLU outputs recomputed in the backward pass, training memory linear in depth; the
  ImageNet stem's BN-ReLU-max-pool and the transitions around such blocks recompute theirs too
  (efficient_stem.py, run by ``run_features`` in a training forward with gradients).

Nothing in ``forward`` overrides the choice: not grad mode, autocast, layout or compiling (torch.compile runs
the two buffer blocks eagerly between its compiled pieces). The buffer blocks run their own autograd code,
which a tracer cannot record, so tracing or exporting one is an error naming the fix (``set_block_impl("plain")``)
rather than a silent switch to another implementation.

One definition serves signals, images and volumes: ``spatial_dims`` 1, 2 (the default, the paper's) or 3 picks
the convolution, batch norm and pooling classes from one small table (``OPS``), as MONAI's DenseNet does; the
layers, blocks, transitions and the three block implementations are the same code in every dimensionality.
A 2D model is the paper's and torchvision's, state dict included; a 3D DenseNet-121 has MONAI's DenseNet121's
parameters and logits for the same weights (tests/models/test_monai_parity.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Literal, NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from densenet.errors import ConfigError, DenseNetError
from densenet.models.concat_free import concat_free_block_forward
from densenet.models.efficient import efficient_block_forward
from densenet.models.efficient_stem import (
    efficient_stem_forward,
    efficient_transition_forward,
    stem_fusable,
    transition_fusable,
)

StemKind = Literal["cifar", "imagenet", "strided"]
BlockImpl = Literal["plain", "concat_free", "efficient"]
BLOCK_IMPLS: tuple[BlockImpl, ...] = ("plain", "concat_free", "efficient")


class SpatialOps(NamedTuple):
    """The modules and functions that differ between signals (1), images (2) and volumes (3)."""

    conv: type[nn.Conv1d | nn.Conv2d | nn.Conv3d]
    batch_norm: type[nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d]
    avg_pool: type[nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d]
    max_pool: type[nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d]
    global_pool: Callable[[Tensor, int], Tensor]


# spatial_dims -> the per-dimensionality pieces: the one place where a 2D assumption could hide.
OPS: dict[int, SpatialOps] = {
    1: SpatialOps(nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.MaxPool1d, F.adaptive_avg_pool1d),
    2: SpatialOps(nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, F.adaptive_avg_pool2d),
    3: SpatialOps(nn.Conv3d, nn.BatchNorm3d, nn.AvgPool3d, nn.MaxPool3d, F.adaptive_avg_pool3d),
}
BATCH_NORMS = tuple(ops.batch_norm for ops in OPS.values())


def spatial_ops(spatial_dims: int) -> SpatialOps:
    """The table entry of ``spatial_dims``; a ConfigError naming the choices otherwise."""
    if spatial_dims not in OPS:
        raise ConfigError(f"spatial_dims must be 1 (signals), 2 (images) or 3 (volumes), got {spatial_dims!r}")
    return OPS[spatial_dims]


class DenseLayer(nn.Module):
    """H_l: BN-ReLU-Conv3x3 (basic) or BN-ReLU-Conv1x1(bottleneck_width*k)-BN-ReLU-Conv3x3 (DenseNet-B).

    In the basic layer the only convolution is ``conv2`` (the 3x3), so that every 3x3 convolution of
    every DenseNet has the same name and torchvision's bottleneck layers keep theirs.
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int | None, drop_rate: float,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        ops = spatial_ops(spatial_dims)
        self.in_channels = in_channels
        self.drop_rate = float(drop_rate)
        self.bottleneck = bool(bottleneck_width)
        if self.bottleneck:
            inner = bottleneck_width * growth_rate
            self.norm1 = ops.batch_norm(in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = ops.conv(in_channels, inner, kernel_size=1, stride=1, bias=False)
        else:
            inner = in_channels
        self.norm2 = ops.batch_norm(inner)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = ops.conv(inner, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """H_l([x_0, x_1, ..., x_{l-1}]): the earlier maps (a list, concatenated here) or their concatenation."""
        if not isinstance(x, Tensor):
            x = torch.cat(list(x), dim=1)
        if self.bottleneck:
            x = self.dropout(self.conv1(self.relu1(self.norm1(x))))
        return self.dropout(self.conv2(self.relu2(self.norm2(x))))

    def dropout(self, x: Tensor) -> Tensor:
        """The layer's dropout after each convolution; the plain and concat-free blocks both call this one, so
        that a seeded run draws the same masks in either (the efficient block keeps its masks instead)."""
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; layer l sees the block input and the k maps of every earlier layer.

    ``block_impl`` says how the block computes its output (BLOCK_IMPLS, the module docstring); it is an
    attribute, not a parameter or buffer, so the state dict is the same whichever runs.
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bottleneck_width: int | None,
        drop_rate: float,
        block_impl: BlockImpl = "plain",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.out_channels = in_channels + num_layers * growth_rate
        self.block_impl: BlockImpl = check_block_impl(block_impl)
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck_width, drop_rate, spatial_dims)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        """[x_0, x_1, ..., x_L]: the block's input and every layer's k maps, concatenated, by ``block_impl``."""
        impl = self.block_impl
        if impl == "plain":
            features = [x]
            for layer in self.values():
                features.append(layer(features))
            return torch.cat(features, dim=1)
        if _tracing():
            raise DenseNetError(f"block_impl {impl!r} runs its own autograd code, which tracing and export cannot "
                                f"record; call model.set_block_impl('plain') first (same weights, same results)")
        if impl == "concat_free":
            return concat_free_block_forward(self, x)
        return efficient_block_forward(self, x)

    def extra_repr(self) -> str:
        return f"block_impl={self.block_impl!r}"


def _tracing() -> bool:
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


def check_block_impl(block_impl: str) -> BlockImpl:
    """``block_impl`` if it is one of BLOCK_IMPLS; a ConfigError listing them otherwise."""
    if block_impl not in BLOCK_IMPLS:
        raise ConfigError(f"block_impl must be one of {', '.join(BLOCK_IMPLS)}, got {block_impl!r}")
    return block_impl  # type: ignore[return-value]


def resolve_block_impl(block_impl: str | None, memory_efficient: bool) -> BlockImpl:
    """The implementation the constructor arguments ask for: ``memory_efficient=True`` is torchvision's
    spelling of "efficient", and neither given is "plain"."""
    if memory_efficient and block_impl not in (None, "efficient"):
        raise ConfigError(f"memory_efficient=True means block_impl='efficient', not {block_impl!r}; give one of them")
    return check_block_impl(block_impl or ("efficient" if memory_efficient else "plain"))


def set_block_impl(module: nn.Module, block_impl: str) -> None:
    """Every dense block inside ``module`` (a DenseNet, a backbone, a DDP or torch.compile wrapper) runs
    ``block_impl`` from the next forward pass on."""
    impl = check_block_impl(block_impl)
    for m in module.modules():
        if isinstance(m, DenseBlock):
            m.block_impl = impl


def block_impl_of(module: nn.Module) -> str:
    """The ``block_impl`` of the dense blocks inside ``module``; "mixed" if someone set blocks one by one."""
    impls = {m.block_impl for m in module.modules() if isinstance(m, DenseBlock)}
    return impls.pop() if len(impls) == 1 else "mixed"


class BlockImplSetting:
    """``block_impl`` and ``set_block_impl`` of a module that holds dense blocks (DenseNet, DenseNetFeatures)."""

    @property
    def block_impl(self) -> str:
        """How the dense blocks compute their output (BLOCK_IMPLS); change it with ``set_block_impl``."""
        return block_impl_of(self)

    def set_block_impl(self, block_impl: BlockImpl) -> Self:
        """Run every dense block as ``block_impl`` from now on; returns the module, as ``.to()`` does."""
        set_block_impl(self, block_impl)
        return self


def tap_blocks(modules: Iterable[nn.Module], x: Tensor, taps: Container[int], num_blocks: int) -> list[Tensor]:
    """Run ``modules`` (a DenseNet's ``features``, whole or cut after a block) on ``x`` and return the output of
    every dense block whose index (from 0) is in ``taps``; the last block's is taken after the final BN
    (``norm5``) and its ReLU, as ``forward_features`` gives it. What forward_intermediates and a
    ``features_only`` backbone (features.py) both return."""
    outputs = []
    x = run_features(modules, x, lambda index, out: outputs.append(out) if index in taps and index != num_blocks - 1
                     else None)
    if num_blocks - 1 in taps:
        outputs.append(F.relu(x))
    return outputs


def run_features(modules: Iterable[nn.Module], x: Tensor,
                 on_block: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run ``modules`` (a DenseNet's ``features``, whole or cut after a block) on ``x``, one after the other, and
    return the last output; ``on_block(i, out)`` sees the output of the i-th dense block (from 0).

    In a training forward with gradients, the ImageNet stem's norm0-relu0-pool0 before an "efficient" block and
    a transition after one run as one memory-efficient step each (efficient_stem.py): same results, a fraction
    of the memory. Eval mode, no_grad, torch.compile, tracing and export run every module as it is.
    """
    mods = list(modules)
    fuse = torch.is_grad_enabled() and not _tracing() and not torch.compiler.is_compiling()
    previous = None  # the block_impl of the last dense block run
    private = False  # x is the output of that block, and nothing but the next module sees it (no hook, no on_block)
    block, i = -1, 0
    while i < len(mods):
        module = mods[i]
        if (fuse and i + 2 < len(mods) and stem_fusable(module, mods[i + 1], mods[i + 2], x)
                and _next_block_impl(mods, i) == "efficient"):
            x = efficient_stem_forward(module, mods[i + 2], x)  # norm0, relu0, pool0
            i += 3
            continue
        if fuse and previous == "efficient" and isinstance(module, Transition) and transition_fusable(module, x):
            x = efficient_transition_forward(module, x, private_input=private)
        else:
            x = module(x)
        private = False
        if isinstance(module, DenseBlock):
            previous, block = module.block_impl, block + 1
            if on_block is not None:
                on_block(block, x)
            elif fuse and not _has_hooks(module):
                private = True
        i += 1
    return x


def _has_hooks(module: nn.Module) -> bool:
    """Whether any module hook (of ``module`` or global) may see ``module``'s output or its gradient."""
    own = ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
    shared = ("_global_forward_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return (any(getattr(module, name, None) for name in own)
            or any(getattr(torch_module, name, None) for name in shared))


def _next_block_impl(mods: list[nn.Module], start: int) -> str | None:
    return next((m.block_impl for m in mods[start:] if isinstance(m, DenseBlock)), None)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 between dense blocks; the 1x1 convolution applies the compression."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0, spatial_dims: int = 2) -> None:
        super().__init__()
        ops = spatial_ops(spatial_dims)
        self.add_module("norm", ops.batch_norm(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", ops.conv(in_channels, out_channels, kernel_size=1, stride=1, bias=False))
        if drop_rate > 0:
            # The paper drops out after every convolution but the first; Dropout has no state, so the
            # state dict stays the same with or without it.
            self.add_module("drop", nn.Dropout(drop_rate))
        self.add_module("pool", ops.avg_pool(kernel_size=2, stride=2))


class DenseNet(BlockImplSetting, nn.Module):
    """A Densely Connected Convolutional Network.

    Args:
        growth_rate: k, the maps each dense layer adds.
        block_config: layers in each dense block, e.g. (6, 12, 24, 16) for DenseNet-121.
        num_init_features: maps out of the stem; default 2k with the bottleneck, else 16 (the paper's).
        bottleneck_width: the 1x1 convolution outputs bottleneck_width*k maps (4 in the paper);
            None or 0 for the basic layer.
        compression: theta in (0, 1]; a transition outputs floor(theta*m) of its m input maps.
        stem: "cifar" (one 3x3 convolution, nothing after it), "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool)
            or "strided" (one 3x3 convolution of stride 2, nothing after it: the first block at half the input's
            side, for small volumes such as MedMNIST's 28^3, where the CIFAR stem's full-size first block costs
            8x more in 3D and the ImageNet stem's quarter size keeps 7^3 voxels).
        in_chans, num_classes: input channels and classifier outputs (0 for no classifier).
        drop_rate: dropout after every convolution but the first (the paper's 0.2 without augmentation).
        block_impl: how each dense block computes its output: "plain" (default), "concat_free" or
            "efficient" (the module docstring); same parameters, same results. Changed later by
            ``set_block_impl``; not part of ``config`` (weight files hold the same tensors whichever ran).
        memory_efficient: torchvision's spelling of block_impl="efficient" (shared storage, BN-ReLU(-Conv1x1)
            outputs recomputed in the backward pass: training memory linear in depth).
        spatial_dims: 1 (signals, N x C x L), 2 (images, the default) or 3 (volumes, N x C x D x H x W): which
            convolutions, batch norms and pools (``OPS``); kernels are k^spatial_dims, strides and pooling windows
            the same in every dimension. Part of ``config`` (weight files rebuild a 3D model).
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int | None = None,
        bottleneck_width: int | None = 4,
        compression: float = 0.5,
        stem: StemKind = "imagenet",
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        block_impl: BlockImpl | None = None,
        memory_efficient: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        impl = resolve_block_impl(block_impl, memory_efficient)
        ops = spatial_ops(spatial_dims)
        block_config = tuple(int(n) for n in block_config)
        if num_init_features is None:
            num_init_features = 2 * growth_rate if bottleneck_width else 16
        _validate(growth_rate, block_config, num_init_features, bottleneck_width, compression, stem, in_chans,
                  num_classes, drop_rate)
        # The constructor arguments, enough to rebuild the network (weight files store them); the attributes
        # growth_rate, block_config, ... read them from here.
        self.config = dict(growth_rate=growth_rate, block_config=list(block_config),
                           num_init_features=num_init_features, bottleneck_width=bottleneck_width or None,
                           compression=compression, stem=stem, in_chans=in_chans, num_classes=num_classes,
                           drop_rate=drop_rate, spatial_dims=spatial_dims)

        features = nn.Sequential()
        if stem == "imagenet":
            features.add_module("conv0", ops.conv(in_chans, num_init_features, 7, stride=2, padding=3, bias=False))
            features.add_module("norm0", ops.batch_norm(num_init_features))
            features.add_module("relu0", nn.ReLU(inplace=True))
            features.add_module("pool0", ops.max_pool(kernel_size=3, stride=2, padding=1))
            reduction = 4
        else:
            stride = 2 if stem == "strided" else 1
            features.add_module("conv0", ops.conv(in_chans, num_init_features, 3, stride=stride, padding=1,
                                                  bias=False))
            reduction = stride

        self.feature_info: list[dict] = []
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bottleneck_width or None, drop_rate, impl,
                               spatial_dims)
            features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"features.denseblock{i + 1}"))
            if i != len(block_config) - 1:
                out_channels = int(math.floor(compression * channels))
                features.add_module(f"transition{i + 1}", Transition(channels, out_channels, drop_rate, spatial_dims))
                channels = out_channels
                reduction *= 2
        # torchvision calls the final BN norm5 whatever the number of blocks; keep its name.
        features.add_module("norm5", ops.batch_norm(channels))
        self.feature_info[-1]["module"] = "features.norm5"
        self.features = features
        self.num_features = channels
        self.classifier: nn.Module = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # The paper's released code: He-normal (fan-out) convolutions, BN 1/0, linear bias 0.
        if next(self.parameters()).is_meta:
            return  # shape-only copies (parameter and MAC counts) have no values to initialise
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BATCH_NORMS):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    growth_rate = property(lambda self: self.config["growth_rate"])
    block_config = property(lambda self: tuple(self.config["block_config"]))
    bottleneck_width = property(lambda self: self.config["bottleneck_width"])
    compression = property(lambda self: self.config["compression"])
    stem = property(lambda self: self.config["stem"])
    in_chans = property(lambda self: self.config["in_chans"])
    num_classes = property(lambda self: self.config["num_classes"])
    drop_rate = property(lambda self: self.config["drop_rate"])
    # Configurations written before volumes were supported have no spatial_dims: they are 2D.
    spatial_dims = property(lambda self: self.config.get("spatial_dims", 2))

    @property
    def memory_efficient(self) -> bool:
        """torchvision's name: whether the blocks run as "efficient"."""
        return self.block_impl == "efficient"

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        # True is "efficient"; False is the standard ("plain") block, as in torchvision, whatever ran before.
        set_block_impl(self, "efficient" if value else "plain")

    def extra_repr(self) -> str:
        return f"block_impl={self.block_impl!r}"

    def dense_blocks(self) -> list[DenseBlock]:
        return [m for m in self.features if isinstance(m, DenseBlock)]

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, dense blocks, transitions and the final BN-ReLU: the maps before global pooling."""
        if torch.compiler.is_compiling():  # a compiled graph gets the ordinary stem and transitions
            return F.relu(self.features(x), inplace=True)
        return F.relu(run_features(self.features, x), inplace=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(OPS[self.spatial_dims].global_pool(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """One feature map per dense block (the last after the final BN-ReLU), for use as a backbone.

        Their channels and strides are ``feature_info``'s ``num_chs`` and ``reduction``.
        """
        blocks = len(self.block_config)
        return tap_blocks(self.features, x, range(blocks), blocks)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for num_classes (0 removes it), e.g. for fine-tuning."""
        self.config["num_classes"] = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.classifier.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier


def _validate(growth_rate, block_config, num_init_features, bottleneck_width, compression, stem, in_chans,
              num_classes, drop_rate) -> None:
    if not isinstance(growth_rate, int) or growth_rate <= 0:
        raise ConfigError(f"growth_rate must be a positive integer, got {growth_rate!r}")
    if not block_config or any(n <= 0 for n in block_config):
        raise ConfigError(f"block_config must be a non-empty list of positive layer counts, got {block_config!r}")
    if num_init_features <= 0:
        raise ConfigError(f"num_init_features must be positive, got {num_init_features!r}")
    if bottleneck_width is not None and bottleneck_width < 0:
        raise ConfigError(f"bottleneck_width must be None, 0 (no bottleneck) or positive, got {bottleneck_width!r}")
    if not (isinstance(compression, int | float) and 0 < compression <= 1):
        raise ConfigError(f"compression must be in (0, 1] (1 = none, the paper's DenseNet-C uses 0.5), "
                          f"got {compression!r}")
    if stem not in ("cifar", "imagenet", "strided"):
        raise ConfigError(f"stem must be 'cifar', 'imagenet' or 'strided', got {stem!r}")
    if in_chans <= 0:
        raise ConfigError(f"in_chans must be positive, got {in_chans!r}")
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, got {num_classes!r}")
    if not 0 <= drop_rate < 1:
        raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
