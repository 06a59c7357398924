"""The concatenation-free standard block against torchvision's DenseNet and the plain concatenation: outputs,
gradients (float64: exact up to rounding), running stats, and its per-block storage."""

import copy

import pytest
import torch
import torch.utils.checkpoint
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


def test_the_buffer_path_trains_fp32_nchw_and_autocast_takes_the_plain_concatenation(monkeypatch):
    # Under bf16 autocast the buffer path ran at 0.53x torchvision's eager step (densenet._concat_free).
    calls = []
    real = densenet_module.concat_free_block_forward
    monkeypatch.setattr(densenet_module, "concat_free_block_forward",
                        lambda block, x: calls.append(x.dtype) or real(block, x))
    ours, _ = _pair()
    x = torch.randn(2, 3, 8, 8)
    ours(x).sum().backward()
    assert calls == [torch.float32] * 2  # both blocks
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    out.float().sum().backward()
    assert calls == [] and out.dtype == torch.bfloat16


@pytest.mark.parametrize("efficient", [False, True])
def test_bf16_autocast_as_accurate_as_torchvision(efficient):
    # The oracle is float32, with torchvision's own bf16 error as the yardstick: the memory-efficient block's
    # BN-ReLU computes in the maps' dtype, centred on the rounded mean (block_buffer.bn_factors), so it does
    # not round where torchvision's kernels do, but it must not be less accurate; the standard block takes the
    # plain concatenation under autocast (densenet._concat_free). Relative error of every parameter's gradient,
    # averaged over five inputs (2026-11-30: efficient 0.060, torchvision 0.060).
    def grads(model, x, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().sum().backward()
        return out.float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])

    errors = {"ours": [], "torchvision": []}
    for seed in range(5):
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
        truth = grads(_pair()[1], x, bf16=False)[1]
        ours, reference = _pair()
        ours.memory_efficient = efficient
        out_a, grad_a = grads(ours, x, bf16=True)
        out_b, grad_b = grads(reference, x, bf16=True)
        torch.testing.assert_close(out_a, out_b, rtol=0.05, atol=0.05)
        errors["ours"].append(((grad_a - truth).norm() / truth.norm()).item())
        errors["torchvision"].append(((grad_b - truth).norm() / truth.norm()).item())
    ours_error, reference_error = (sum(e) / len(e) for e in (errors["ours"], errors["torchvision"]))
    assert ours_error < 1.25 * reference_error, errors


def _float64_pair(bottleneck, drop_rate):
    torch.manual_seed(0)
    model = densenet.DenseNet(growth_rate=4, block_config=(3, 2), bottleneck_width=4 if bottleneck else None,
                              stem="cifar", num_classes=5, drop_rate=drop_rate).double()
    with torch.no_grad():  # non-trivial BN parameters, so that a wrong scale or shift shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model, copy.deepcopy(model)


def _run(model, concat_free, monkeypatch, fn):
    monkeypatch.setattr(densenet_module, "_concat_free", lambda t, on=concat_free: on)
    return fn(model)


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "basic"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_float64_sgd_steps_equal_the_plain_concatenation(bottleneck, drop_rate, monkeypatch):
    # The block's shared storage (BN1-ReLU outputs, one gradient buffer per block): every gradient, loss and BN
    # buffer over two SGD-momentum steps equals the plain torch.cat block's, in float64.
    ours, plain = _float64_pair(bottleneck, drop_rate)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, plain)}
    for step in range(2):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        y = torch.randint(0, 5, (4,))
        results = []
        for model, concat_free in ((ours, True), (plain, False)):
            def fn(m, x=x, y=y, step=step):
                xg = x.clone().requires_grad_()
                torch.manual_seed(step)  # the same dropout masks
                loss = torch.nn.functional.cross_entropy(m(xg), y)
                loss.backward()
                return loss.detach(), xg.grad
            results.append(_run(model, concat_free, monkeypatch, fn))
        (loss_a, grad_a), (loss_b, grad_b) = results
        torch.testing.assert_close(loss_a, loss_b)
        torch.testing.assert_close(grad_a, grad_b)
        for (name, a), b in zip(ours.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name}: {m}")
        for opt in opts.values():
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours.state_dict(), plain.state_dict())


def test_maps_used_outside_the_block_and_retain_graph_get_exact_gradients(monkeypatch):
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

    first_a, grad_a, params_a = _run(ours, True, monkeypatch, fn)
    first_b, grad_b, params_b = _run(plain, False, monkeypatch, fn)
    torch.testing.assert_close(first_a, first_b)
    torch.testing.assert_close(grad_a, grad_b)
    torch.testing.assert_close(grad_a, 2 * first_a)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], msg=name)


def test_loss_on_one_map_only(monkeypatch):
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

    grads_a = _run(ours, True, monkeypatch, fn)
    grads_b = _run(plain, False, monkeypatch, fn)
    assert grads_a.keys() == grads_b.keys() and "features.denseblock1.denselayer1.conv1.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_non_reentrant_checkpoint_of_a_block(monkeypatch):
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

    grad_a, params_a = _run(ours, True, monkeypatch, fn)
    grad_b, params_b = _run(plain, False, monkeypatch, fn)
    torch.testing.assert_close(grad_a, grad_b)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], msg=name)


def test_bn_relu_outputs_share_one_storage_per_block():
    # What the default allocator needs (docs/memory.md): the tensors of the block's growing width are not
    # allocated one per layer. Every layer's saved BN1-ReLU output is a piece of one storage per block.
    torch.manual_seed(0)
    model = densenet.DenseNet(growth_rate=4, block_config=(3, 2), stem="cifar", num_classes=5)
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
