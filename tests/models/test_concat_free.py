"""The concatenation-free standard block against torchvision's DenseNet: outputs, gradients, running stats."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import densenet
import densenet.models.densenet as densenet_module


def _pair(drop_rate=0.0):
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=4,
                                            num_classes=5, drop_rate=drop_rate)
    reference.features.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    del reference.features.norm0, reference.features.relu0, reference.features.pool0
    ours = densenet.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, stem="cifar", num_classes=5,
                             drop_rate=drop_rate)
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():  # non-trivial BN parameters, so that a wrong scale or shift shows
        for a, b in zip(reference.modules(), ours.modules(), strict=True):
            if isinstance(a, nn.BatchNorm2d):
                a.weight.uniform_(0.5, 1.5), a.bias.uniform_(-0.5, 0.5)
                b.weight.copy_(a.weight), b.bias.copy_(a.bias)
    return ours, reference


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_equals_torchvision(channels_last):
    ours, reference = _pair()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours, reference = ours.to(memory_format=fmt), reference.to(memory_format=fmt)
    x = torch.randn(6, 3, 8, 8).to(memory_format=fmt)
    for _ in range(2):  # twice: the running statistics must follow torchvision's
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours(xa), reference(xb)
        torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
        (out_a.square().sum()).backward()
        (out_b.square().sum()).backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    grads_b = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    buffers_b = dict(reference.named_buffers())
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, buffers_b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["densenet16_k4", "densenet_bc16_k4"])
def test_basic_layers_and_dropout_match_the_plain_concatenation(name, monkeypatch):
    # basic layers: norm2 reads the concatenation; dropout: the same draws in the same order
    torch.manual_seed(0)
    model = densenet.create_model(name, drop_rate=0.2)
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    results = []
    for net, concat_free in ((model, True), (plain, False)):
        monkeypatch.setattr(densenet_module, "_concat_free", lambda t, on=concat_free: on)
        torch.manual_seed(1)
        out = net(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in net.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-5, msg=n)


def test_eval_mode_gradients_use_running_statistics():
    ours, reference = _pair()
    ours.eval(), reference.eval()
    x = torch.randn(3, 3, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).sum().backward()
    reference(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_close_to_torchvision():
    ours, reference = _pair()
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, out_b = ours(x), reference(x)
    torch.testing.assert_close(out_a.float(), out_b.float(), rtol=0.05, atol=0.05)
    out_a.float().sum().backward()
    out_b.float().sum().backward()
    ga = ours.features.conv0.weight.grad
    gb = reference.features.conv0.weight.grad
    assert torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99
