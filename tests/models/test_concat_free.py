"""The concatenation-free block (block_impl="concat_free") against torchvision's DenseNet and the plain
concatenation: what only this block has to get right (its own autograd Functions, its per-block storage, its
memory). The float64 oracle tests it shares with the efficient block are in test_block_impl.py."""

import copy

import pytest
import torch
import torch.utils.checkpoint
import torchvision
from torch import nn

import densenet
from tests.helpers import training_peak_rss


def _pair(drop_rate=0.0):
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=4,
                                            num_classes=5, drop_rate=drop_rate)
    reference.features.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    del reference.features.norm0, reference.features.relu0, reference.features.pool0
    ours = densenet.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, stem="cifar", num_classes=5,
                             drop_rate=drop_rate, block_impl="concat_free")
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
def test_basic_layers_and_dropout_match_the_plain_concatenation(name):
    # basic layers: norm2 reads the concatenation; dropout: the same draws in the same order
    torch.manual_seed(0)
    model = densenet.create_model(name, drop_rate=0.2, block_impl="concat_free")
    plain = copy.deepcopy(model).set_block_impl("plain")
    x = torch.randn(4, 3, 8, 8)
    results = []
    for net in (model, plain):
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


def _float64_pair(bottleneck, drop_rate):
    """A concat-free model and its plain copy, float64, with non-trivial BN parameters."""
    torch.manual_seed(0)
    model = densenet.DenseNet(growth_rate=4, block_config=(3, 2), bottleneck_width=4 if bottleneck else None,
                              stem="cifar", num_classes=5, drop_rate=drop_rate, block_impl="concat_free").double()
    with torch.no_grad():  # non-trivial BN parameters, so that a wrong scale or shift shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model, copy.deepcopy(model).set_block_impl("plain")


def test_maps_used_outside_the_block_and_retain_graph_get_exact_gradients():
    # Each map's gradient is handed to autograd only once the block's layers have added all of theirs: a map or
    # block input that is also used elsewhere (here: caught by forward hooks, in the loss) must get the sum.
    # And a second backward pass through a retained graph must find its saved tensors intact.
    ours, plain = _float64_pair(bottleneck=True, drop_rate=0.0)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)

    def fn(m):
        extra = []
        hooks = [m.features.denseblock1.denselayer2.conv2.register_forward_hook(lambda mod, i, o: extra.append(o)),
                 m.features.denseblock2.register_forward_pre_hook(lambda mod, i: extra.append(i[0]))]
        xg = x.clone().requires_grad_()
        out = m(xg)
        loss = out.square().sum() + sum((0.5 + i) * t.square().sum() for i, t in enumerate(extra))
        loss.backward(retain_graph=True)
        first = xg.grad.clone()
        loss.backward()
        for h in hooks:
            h.remove()
        return first, xg.grad, {n: p.grad for n, p in m.named_parameters()}

    first_a, grad_a, params_a = fn(ours)
    first_b, grad_b, params_b = fn(plain)
    torch.testing.assert_close(first_a, first_b)
    torch.testing.assert_close(grad_a, grad_b)
    torch.testing.assert_close(grad_a, 2 * first_a)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], msg=name)


def test_loss_on_one_map_only():
    # The block's output is not in the loss, one layer's map is: the layers before it still get their gradients.
    ours, plain = _float64_pair(bottleneck=True, drop_rate=0.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def fn(m):
        caught = []
        hook = m.features.denseblock1.denselayer2.conv2.register_forward_hook(lambda mod, i, o: caught.append(o))
        m(x)
        hook.remove()
        caught[0].square().sum().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    grads_a = fn(ours)
    grads_b = fn(plain)
    assert grads_a.keys() == grads_b.keys() and "features.denseblock1.denselayer1.conv1.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_non_reentrant_checkpoint_of_a_block():
    # torch.utils.checkpoint packs the saved tensors away and recomputes them in the backward pass: the block
    # must keep nothing else of them, and its gradients stay exact.
    ours, plain = _float64_pair(bottleneck=True, drop_rate=0.0)
    block_in = ours.features.denseblock1.in_channels
    x = torch.randn(2, block_in, 8, 8, dtype=torch.float64)

    def fn(m):
        xg = x.clone().requires_grad_()
        block = m.features.denseblock1
        torch.utils.checkpoint.checkpoint(block, xg, use_reentrant=False).square().sum().backward()
        return xg.grad, {n: p.grad for n, p in block.named_parameters()}

    grad_a, params_a = fn(ours)
    grad_b, params_b = fn(plain)
    torch.testing.assert_close(grad_a, grad_b)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], msg=name)


def test_bn_relu_outputs_share_one_storage_per_block():
    # What the default allocator needs (docs/memory.md): the tensors of the block's growing width are not
    # allocated one per layer. Every layer's saved BN1-ReLU output is a piece of one storage per block.
    torch.manual_seed(0)
    model = densenet.DenseNet(growth_rate=4, block_config=(3, 2), stem="cifar", num_classes=5, block_impl="concat_free")
    out = model(torch.randn(2, 3, 8, 8))
    storages, seen, stack = {}, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_ConcatBatchNormReLUBackward":
            x, y = node.saved_tensors[:2]  # the buffer's channels read, the BN1-ReLU output
            assert y.is_contiguous() and not y._is_view() and not x._is_view()
            storages.setdefault(y.shape[2], set()).add(y.untyped_storage().data_ptr())
            storages.setdefault(("layers", y.shape[2]), set()).add(y.shape[1])
        stack.extend(fn for fn, _ in node.next_functions)
    assert len(storages[8]) == 1 and len(storages[("layers", 8)]) == 3
    assert len(storages[4]) == 1 and len(storages[("layers", 4)]) == 2
    assert storages[8] != storages[4]


@pytest.mark.slow
def test_training_peak_memory_below_the_plain_concatenation(tmp_path):
    # Why the block exists: in eager fp32 NCHW training (where densenet train runs it) each map is written
    # once instead of concatenated afresh for every later layer. Peak RSS over two SGD steps, default
    # allocator, a fresh process each (`densenet bench memory` measures the same at full size).
    used = training_peak_rss(tmp_path, 32, ("plain", "concat_free"))
    assert used["concat_free"] < 0.8 * used["plain"], used  # 2026-12-06: 477 against 673 MB (0.71)
