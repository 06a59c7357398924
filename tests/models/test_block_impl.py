"""The dense block's implementations (``block_impl``) against the standard one, "plain" (torch.cat, as
torchvision): in float64 the same losses, input and parameter gradients, BN running statistics and state dicts,
for signals, images and volumes (spatial_dims 1, 2, 3); and the choice is a visible setting that no ambient
state (grad mode, autocast, layout) overrides."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import densenet
import densenet.models.densenet as densenet_module
from densenet.errors import ConfigError, DenseNetError
from densenet.models.compat import torchvision_reference
from densenet.models.densenet import BLOCK_IMPLS, DenseNet

OTHERS = [impl for impl in BLOCK_IMPLS if impl != "plain"]
SIDE = {1: 16, 2: 8, 3: 6}  # tiny inputs of each dimensionality, all through one transition


def _input(n, spatial_dims=2, dtype=torch.float64):
    return torch.randn(n, 3, *([SIDE[spatial_dims]] * spatial_dims), dtype=dtype)


def _pair(impl, bottleneck=True, drop_rate=0.0, dtype=torch.float64, block_config=(3, 2), spatial_dims=2,
          stem="cifar"):
    """The plain model and a copy running ``impl``, with non-trivial BN parameters (a wrong scale or shift shows)."""
    torch.manual_seed(0)
    plain = DenseNet(growth_rate=4, block_config=block_config, bottleneck_width=4 if bottleneck else None,
                     stem=stem, num_classes=5, drop_rate=drop_rate, spatial_dims=spatial_dims).to(dtype)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    other = copy.deepcopy(plain).set_block_impl(impl)
    assert plain.block_impl == "plain" and other.block_impl == impl
    return plain, other


def _step(model, x, y, seed):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks in every implementation
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), x.grad


def _assert_grads_equal(plain, other, **tol):
    for (name, a), b in zip(plain.named_parameters(), other.parameters(), strict=True):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.slow
@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "basic"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_sgd_steps_equal_plain_in_float64(impl, bottleneck, drop_rate, spatial_dims):
    plain, other = _pair(impl, bottleneck, drop_rate, spatial_dims=spatial_dims)
    _sgd_steps_side_by_side(plain, other, lambda: (_input(4, spatial_dims), torch.randint(0, 5, (4,))))


def _sgd_steps_side_by_side(plain, other, batch, steps: int = 3) -> None:
    """``steps`` SGD steps of both models on the same batches (``batch()`` draws one): loss, input and parameter
    gradients equal at every step, and after them every buffer (BN running statistics follow the plain
    block's, updated exactly once per forward) and the state dicts."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, other)]
    for step in range(steps):
        x, y = batch()
        loss_a, grad_a = _step(plain, x, y, seed=step)
        loss_b, grad_b = _step(other, x, y, seed=step)
        torch.testing.assert_close(loss_b, loss_a)
        torch.testing.assert_close(grad_b, grad_a)
        _assert_grads_equal(plain, other)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(plain.named_buffers(), other.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"{name}: {m}")
        if name.endswith("num_batches_tracked"):
            assert int(b) == steps, name
    torch.testing.assert_close(other.state_dict(), plain.state_dict())


# The ImageNet stem (7^d/2 conv, BN-ReLU, 3^d/2 max-pool) on tiny odd sides: a last max-pool window cut by
# the border, and transitions whose average pool drops an odd side's last row (1D: 37 -> 19 -> 10 -> 5 -> 2;
# 2D: 19 -> 10 -> 5 -> 2 -> 1; 3D: 21 -> 11 -> 6 -> 3 -> 1).
IMAGENET_SIDE = {1: 37, 2: 19, 3: 21}


@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("part_bytes", [1, 1 << 30], ids=["one_sample", "whole_batch"])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_imagenet_stem_and_transitions_equal_plain_in_float64(impl, part_bytes, spatial_dims, monkeypatch):
    # In the efficient mode the stem's BN-ReLU-max-pool and each transition run as memory-efficient steps
    # (efficient_stem.py) that recompute BN-ReLU in the backward pass, one sample at a time or the whole batch
    # at once: loss, input and parameter gradients, and every BN buffer (num_batches_tracked: one update per
    # forward) over three SGD steps, dropout in the transitions included.
    from densenet.models import efficient_stem

    monkeypatch.setattr(efficient_stem, "_PART_BYTES", part_bytes)
    fused = []
    for name in ("_Stem", "_Transition"):
        cls = getattr(efficient_stem, name)
        monkeypatch.setattr(cls, "apply", staticmethod(lambda *a, real=cls.apply, name=name: fused.append(name)
                                                       or real(*a)))
    plain, other = _pair(impl, drop_rate=0.2, block_config=(2, 2, 1), spatial_dims=spatial_dims, stem="imagenet")
    side = [IMAGENET_SIDE[spatial_dims]] * spatial_dims
    _sgd_steps_side_by_side(plain, other, lambda: (torch.randn(3, 3, *side, dtype=torch.float64),
                                                   torch.randint(0, 5, (3,))))
    assert fused == ([] if impl != "efficient" else ["_Stem", "_Transition", "_Transition"] * 3)


@pytest.mark.parametrize("impl", OTHERS)
def test_float32_and_momentum_none(impl):
    plain, other = _pair(impl, dtype=torch.float32)
    for m in (plain, other):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None  # cumulative average: depends on num_batches_tracked being right
    for step in range(2):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        loss_a, grad_a = _step(plain, x, y, step)
        loss_b, grad_b = _step(other, x, y, step)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5)
    _assert_grads_equal(plain, other, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(other.state_dict(), plain.state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_eval_mode_forward_and_input_gradient(impl, spatial_dims):
    plain, other = _pair(impl, drop_rate=0.2, spatial_dims=spatial_dims)
    for m in (plain, other):
        m.train()(_input(4, spatial_dims))  # non-trivial running statistics
        m.eval()
    other.load_state_dict(plain.state_dict())
    x, y = _input(2, spatial_dims), torch.randint(0, 5, (2,))
    with torch.no_grad():
        torch.testing.assert_close(other(x), plain(x))
    loss_a, grad_a = _step(plain, x, y, 0)
    loss_b, grad_b = _step(other, x, y, 0)
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(grad_b, grad_a)
    _assert_grads_equal(plain, other)
    torch.testing.assert_close(other.state_dict(), plain.state_dict())  # eval touches no statistics


@pytest.mark.slow
@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "basic"])
@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
def test_channels_last(impl, bottleneck, spatial_dims):
    # channels_last for images, channels_last_3d for volumes.
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    plain, other = _pair(impl, bottleneck, drop_rate=0.2, spatial_dims=spatial_dims)
    for m in (plain, other):
        m.to(memory_format=layout)
    x = _input(4, spatial_dims).to(memory_format=layout)
    y = torch.randint(0, 5, (4,))
    for m in (plain, other):  # the block's output keeps the layout (both models: the same statistics update)
        torch.manual_seed(0)
        out = m.features(x)
        # torch's CPU 3D convolutions and pools return NCDHW whatever their input: only images keep the layout.
        assert out.is_contiguous(memory_format=layout) or spatial_dims == 3
    for step in range(2):
        loss_a, grad_a = _step(plain, x, y, step)
        loss_b, grad_b = _step(other, x, y, step)
        torch.testing.assert_close(loss_b, loss_a)
        torch.testing.assert_close(grad_b, grad_a)
    _assert_grads_equal(plain, other)
    torch.testing.assert_close(other.state_dict(), plain.state_dict())


@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_no_grad_and_frozen_parameters(impl, spatial_dims):
    plain, other = _pair(impl, spatial_dims=spatial_dims)
    x = _input(2, spatial_dims)
    with torch.no_grad():
        torch.testing.assert_close(other(x), plain(x))
    for m in (plain, other):
        m.requires_grad_(False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).sum().backward()
    other(xb).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    assert all(p.grad is None for p in other.parameters())
    torch.testing.assert_close(other.state_dict(), plain.state_dict())


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_state_dicts_identical_and_torchvision_compatible(impl):
    # The implementation is not in the state dict: torchvision's weights load into each, the logits are
    # torchvision's, and each one's state dict loads back into torchvision's DenseNet.
    torch.manual_seed(0)
    model = densenet.create_model("densenet_bc16_k4", num_classes=3, block_impl=impl)
    reference = torchvision_reference(model)
    for p in reference.parameters():  # weights that are not the initial ones
        p.data.add_(0.01 * torch.randn_like(p))
    model.load_state_dict(reference.state_dict(), strict=True)
    assert model.state_dict().keys() == densenet.create_model("densenet_bc16_k4", num_classes=3).state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    reference.load_state_dict(model.state_dict(), strict=True)
    assert model.block_impl == impl  # loading weights leaves the choice alone


def test_the_setting_is_stored_visible_and_validated():
    model = densenet.create_model("densenet_bc16_k4", num_classes=3)
    assert model.block_impl == "plain" and not model.memory_efficient  # the default: torchvision's block
    assert repr(model).splitlines()[1].strip() == "block_impl='plain'"  # the model's own line, before its modules
    assert model.set_block_impl("concat_free") is model
    assert model.block_impl == "concat_free" and "block_impl='concat_free'" in repr(model)
    assert all(block.block_impl == "concat_free" for block in model.dense_blocks())
    # memory_efficient is torchvision's spelling of "efficient", in the constructor and as an attribute.
    assert densenet.create_model("densenet_bc16_k4", memory_efficient=True).block_impl == "efficient"
    model.memory_efficient = True
    assert model.block_impl == "efficient" and model.memory_efficient
    model.memory_efficient = False
    assert model.block_impl == "plain"
    # Weight files rebuild from config, which holds the architecture only.
    assert "block_impl" not in model.config
    with pytest.raises(ConfigError, match="block_impl must be one of plain, concat_free, efficient"):
        model.set_block_impl("fast")
    with pytest.raises(ConfigError, match="memory_efficient=True means block_impl='efficient'"):
        densenet.create_model("densenet_bc16_k4", memory_efficient=True, block_impl="concat_free")
    # One block set by hand: the model says so rather than name one of them.
    model.features.denseblock1.block_impl = "concat_free"
    assert model.block_impl == "mixed"
    # A backbone holds the model's blocks, and their setting.
    backbone = densenet.create_model("densenet_bc16_k4", features_only=True, block_impl="efficient")
    assert backbone.block_impl == "efficient" and "block_impl='efficient'" in repr(backbone)
    assert backbone.set_block_impl("plain").block_impl == "plain"


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_no_ambient_state_changes_which_implementation_runs(impl, monkeypatch):
    # Training, evaluation, no_grad, bf16 autocast and channels_last all run the chosen implementation.
    calls = []
    for name in ("concat_free_block_forward", "efficient_block_forward"):
        real = getattr(densenet_module, name)
        monkeypatch.setattr(densenet_module, name,
                            lambda block, x, real=real, name=name: calls.append(name) or real(block, x))
    layer_forward = densenet_module.DenseLayer.forward  # what the plain block calls, the others never
    monkeypatch.setattr(densenet_module.DenseLayer, "forward",
                        lambda layer, x: calls.append("plain layer") or layer_forward(layer, x))
    expected = {"concat_free": "concat_free_block_forward", "efficient": "efficient_block_forward"}
    model = densenet.create_model("densenet_bc16_k4", num_classes=3, block_impl=impl)
    x = torch.randn(2, 3, 8, 8)
    runs = {
        "train": lambda: model.train()(x).sum().backward(),
        "eval": lambda: model.eval()(x),
        "no_grad": lambda: torch.no_grad()(lambda: model.train()(x))(),
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)(lambda: model.train()(x))().float().sum()
        .backward(),
        "channels_last": lambda: model.to(memory_format=torch.channels_last).train()(
            x.contiguous(memory_format=torch.channels_last)).sum().backward(),
    }
    for name, run in runs.items():
        calls.clear()
        run()
        if impl == "plain":
            assert calls == ["plain layer"] * sum(model.block_config), (name, calls)
        else:
            assert calls == [expected[impl]] * len(model.block_config), (name, calls)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("impl", OTHERS)
def test_tracing_a_buffer_block_is_an_error_naming_the_fix(impl):
    model = densenet.create_model("densenet_bc16_k4", num_classes=3, block_impl=impl).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(DenseNetError, match=r"set_block_impl\('plain'\)"):
        torch.jit.trace(model, x)
    traced = torch.jit.trace(model.set_block_impl("plain"), x)  # the fix it names
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_bf16_autocast_as_accurate_as_torchvision(impl):
    # The oracle is float32, with torchvision's own bf16 error as the yardstick: the buffer blocks' BN-ReLU
    # computes in the maps' dtype, centred on the rounded mean (block_buffer.bn_factors), so it does not round
    # where torchvision's kernels do, but it must not be less accurate. Relative error of every parameter's
    # gradient, averaged over five inputs (2026-11-30: efficient 0.060, torchvision 0.060).
    def grads(model, x, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().sum().backward()
        return out.float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])

    errors = {"ours": [], "torchvision": []}
    for seed in range(5):
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
        plain, ours = _pair(impl, dtype=torch.float32)
        reference = torchvision_reference(plain)
        truth = grads(copy.deepcopy(reference), x, bf16=False)[1]
        out_a, grad_a = grads(ours, x, bf16=True)
        out_b, grad_b = grads(reference, x, bf16=True)
        assert out_a.dtype == out_b.dtype
        torch.testing.assert_close(out_a, out_b, rtol=0.05, atol=0.05)
        errors["ours"].append(((grad_a - truth).norm() / truth.norm()).item())
        errors["torchvision"].append(((grad_b - truth).norm() / truth.norm()).item())
    ours_error, reference_error = (sum(e) / len(e) for e in (errors["ours"], errors["torchvision"]))
    assert ours_error < 1.25 * reference_error, errors


@pytest.mark.slow
@pytest.mark.parametrize("impl", OTHERS)
def test_compiled_model_runs_its_buffer_blocks_eagerly(impl, monkeypatch):
    # torch.compile compiles the stem, transitions and head, and runs each buffer block eagerly (its forward is
    # excluded from compiling): the chosen implementation runs, untraced, with the plain model's gradients.
    from densenet.models import concat_free, efficient

    calls = []  # a function each block forward calls inside it: once per layer, or once per block
    module, name = (concat_free, "_layer_forward") if impl == "concat_free" else (efficient, "_forward")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(torch.compiler.is_compiling()) or real(*a, **k))
    from densenet.models import efficient_stem

    fused = []  # the compiled graph gets the ordinary transition (efficient_stem.py's runs only in eager training)
    monkeypatch.setattr(efficient_stem._Transition, "apply",
                        staticmethod(lambda *a, real=efficient_stem._Transition.apply: fused.append(1) or real(*a)))
    plain, other = _pair(impl, dtype=torch.float32, block_config=(2, 2))
    for m in (plain, other):
        m.to(memory_format=torch.channels_last)  # the layout compiled training runs in
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (4,))
    compiled = torch.compile(other)
    for step in range(2):
        loss_a, grad_a = _step(plain, x, y, step)
        loss_b, grad_b = _step(compiled, x, y, step)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5)
        _assert_grads_equal(plain, other, rtol=1e-4, atol=1e-5)
        for m in (plain, other):
            m.zero_grad(set_to_none=True)
    # two blocks (of two layers), two steps, never traced
    assert calls == [False] * (8 if impl == "concat_free" else 4), calls
    assert not fused


@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "basic"])
def test_block_given_channels_last_3d_volumes(impl, bottleneck):
    # A dense block fed channels_last_3d maps (torch's 3D convolutions do not produce them on a CPU, a user's
    # own stem may): the buffer and workspaces take that layout, and output and gradients are plain's.
    torch.manual_seed(0)
    block = densenet_module.DenseBlock(3, 6, 4, 4 if bottleneck else None, 0.0, spatial_dims=3).double()
    other = copy.deepcopy(block)
    other.block_impl = impl
    x = torch.randn(3, 6, 4, 5, 3, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, 18, 4, 5, 3, dtype=torch.float64)
    results = []
    for m in (block, other):
        xx = x.clone(memory_format=torch.preserve_format).requires_grad_()
        out = m(xx)
        (out * weight).sum().backward()
        results.append((out, xx.grad, [p.grad for p in m.parameters()]))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(results[1], results[0])
