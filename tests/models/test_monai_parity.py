"""MONAI's DenseNet121/169/201/264 as the oracle of the 1D and 3D models (as torchvision is for 2D): the same
parameter counts for every dimensionality, channel and class count, and, with MONAI's weights loaded into
ours, the same logits and gradients.

MONAI's network is torchvision's layout (7x7/2 stem, 3x3/2 max-pool, BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 layers,
BN-ReLU-Conv1x1-AvgPool transitions, compression 0.5, final BN) with two differences of naming only: each
dense layer's modules sit in a Sequential called ``layers``, and the head is ``class_layers`` (ReLU, global
average pool, flatten, linear ``out``) where ours is ``forward_features``' ReLU, the pool and ``classifier``.
So the state dicts map key for key (``_from_monai``) and nothing is approximated. MONAI is a test-only
dependency (the ``test`` extra); without it these tests are skipped.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import densenet
from densenet.models.weights import infer_config

nets = pytest.importorskip("monai.networks.nets")

MONAI = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201",
         "densenet264": "DenseNet264"}


def _from_monai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI's DenseNet state dict under our (torchvision's) key names."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"(denselayer\d+)\.layers\.", r"\1.", key)
        out[key.replace("class_layers.out.", "classifier.")] = value
    return out


def _perturb(reference: nn.Module) -> None:
    """Non-trivial BN parameters and running statistics: a wrong scale, shift or statistic shows."""
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)


def _pair(name: str, spatial_dims: int, in_channels: int, out_channels: int):
    """MONAI's network with non-trivial weights and BN statistics, and ours with its weights loaded strictly."""
    torch.manual_seed(0)
    reference = getattr(nets, MONAI[name])(spatial_dims=spatial_dims, in_channels=in_channels,
                                           out_channels=out_channels)
    _perturb(reference)
    ours = densenet.create_model(name, spatial_dims=spatial_dims, in_chans=in_channels, num_classes=out_channels,
                                 )
    ours.load_state_dict(_from_monai(reference.state_dict()), strict=True)
    return reference, ours


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The two deepest take 2-5 s each (MONAI's constructor): slow.
@pytest.mark.parametrize("name", ["densenet121", "densenet169",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("densenet201", "densenet264"))])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_parameter_counts_equal_monai(name, spatial_dims):
    # Shapes only (meta device): each dimensionality with one and three channels, two and 14 classes.
    for in_channels, out_channels in ((1, 2), (3, 14)):
        with torch.device("meta"):
            reference = getattr(nets, MONAI[name])(spatial_dims=spatial_dims, in_channels=in_channels,
                                                   out_channels=out_channels)
            ours = densenet.create_model(name, spatial_dims=spatial_dims, in_chans=in_channels,
                                         num_classes=out_channels)
        assert _count(ours) == _count(reference), (name, spatial_dims, in_channels, out_channels)
        shapes = {k: v.shape for k, v in _from_monai(reference.state_dict()).items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_densenet121_logits_equal_monai_for_the_same_weights(spatial_dims):
    reference, ours = _pair("densenet121", spatial_dims, in_channels=1, out_channels=2)
    x = torch.randn(2, 1, *([32] * spatial_dims))  # 32: the smallest side that reaches the fourth block
    reference.eval(), ours.eval()
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        assert expected.abs().max() > 1e-2  # not a degenerate comparison


@pytest.mark.parametrize("block_impl", ["plain", "concat_free", "efficient"])
@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_training_step_equals_monai(spatial_dims, block_impl):
    # Training mode (batch statistics), in float64: logits, input and parameter gradients and the running
    # statistics after the step equal MONAI's for each dense block implementation. A small DenseNet-BC (MONAI's
    # DenseNet class takes the widths): DenseNet-121 at 32^3 ends on 1x1x1 maps, where BN's variance over two
    # values amplifies float64 rounding to 1e-6 and an exactness test would say nothing.
    torch.manual_seed(0)
    reference = nets.DenseNet(spatial_dims=spatial_dims, in_channels=1, out_channels=3, init_features=8,
                              growth_rate=4, block_config=(3, 2), dropout_prob=0.0)
    _perturb(reference)
    ours = densenet.DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, in_chans=1, num_classes=3,
                             spatial_dims=spatial_dims, block_impl=block_impl)
    ours.load_state_dict(_from_monai(reference.state_dict()), strict=True)
    reference.double().train(), ours.double().train()
    x = torch.randn(4, 1, *([16] * spatial_dims), dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    grads = []
    for model in (reference, ours):
        xx = x.clone().requires_grad_()
        logits = model(xx)
        F.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), xx.grad))
    torch.testing.assert_close(grads[1], grads[0])
    theirs = _from_monai({k: p.grad for k, p in reference.named_parameters()})
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[key], msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(ours.state_dict(), _from_monai(reference.state_dict()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet169", "densenet201", "densenet264"])
def test_deeper_3d_logits_equal_monai(name):
    reference, ours = _pair(name, 3, in_channels=3, out_channels=14)
    x = torch.randn(1, 3, 32, 32, 32)
    reference.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_weights_rebuild_a_3d_model_from_its_kernels():
    # A state dict alone (no metadata) says its dimensionality through the first convolution's kernel.
    reference, ours = _pair("densenet121", 3, in_channels=1, out_channels=2)
    config = infer_config(_from_monai(reference.state_dict()))
    assert config["spatial_dims"] == 3 and config["in_chans"] == 1 and config["num_classes"] == 2
    assert config["block_config"] == [6, 12, 24, 16] and config["stem"] == "imagenet"
    assert ours.config["spatial_dims"] == 3
