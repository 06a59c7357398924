"""One definition, three dimensionalities: every registry network builds for signals, images and volumes from the
same code (models/densenet.py's OPS table), 2D is what it was, and weight files rebuild a 1D or 3D model."""

import pytest
import torch
from torch import nn

import densenet
from densenet.errors import ConfigError
from densenet.models.compat import torchvision_reference
from densenet.models.densenet import OPS
from densenet.models.registry import list_models
from densenet.models.weights import infer_config, load_weights, save_weights

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOLS = {1: (nn.AvgPool1d, nn.MaxPool1d), 2: (nn.AvgPool2d, nn.MaxPool2d), 3: (nn.AvgPool3d, nn.MaxPool3d)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_every_registry_model_builds_in_1d_and_3d(name, spatial_dims):
    # Shapes only (meta): each module is the dimensionality's class and each weight its 2D twin's with k^d kernels.
    with torch.device("meta"):
        model = densenet.create_model(name, spatial_dims=spatial_dims, in_chans=1, num_classes=2)
        flat = densenet.create_model(name, in_chans=1, num_classes=2)
    assert model.config["spatial_dims"] == spatial_dims and model.spatial_dims == spatial_dims
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {CONVS[d] for d in (1, 2, 3) if d != spatial_dims}
    assert not kinds & {NORMS[d] for d in (1, 2, 3) if d != spatial_dims}
    assert CONVS[spatial_dims] in kinds and NORMS[spatial_dims] in kinds and POOLS[spatial_dims][0] in kinds
    assert (POOLS[spatial_dims][1] in kinds) == (model.stem == "imagenet")
    ours, theirs = model.state_dict(), flat.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        shape = theirs[key].shape
        if value.dim() == 4 + spatial_dims - 2 and len(shape) == 4:  # a convolution: (out, in, k, k) -> (out, in, k^d)
            assert value.shape == (*shape[:2], *[shape[-1]] * spatial_dims), key
        else:
            assert value.shape == shape, key


@pytest.mark.parametrize("spatial_dims,shape", [(1, (2, 2, 40)), (3, (2, 2, 12, 10, 8))])
def test_forward_backward_and_backbone_in_1d_and_3d(spatial_dims, shape):
    model = densenet.create_model("densenet_bc16_k4", spatial_dims=spatial_dims, in_chans=2, num_classes=3)
    x = torch.randn(*shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in model.parameters())
    maps = model.forward_intermediates(x.detach())
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in model.feature_info]
    assert [m.dim() for m in maps] == [2 + spatial_dims] * 3
    backbone = densenet.create_model("densenet_bc16_k4", spatial_dims=spatial_dims, features_only=True,
                                     in_chans=2, out_indices=(0, 2))
    assert [m.dim() for m in backbone(x.detach())] == [2 + spatial_dims] * 2


def test_2d_is_unchanged():
    # The default is 2D; spatial_dims=2 builds the very same network: module classes, keys and (seeded) values.
    torch.manual_seed(0)
    default = densenet.create_model("densenet_bc16_k4", num_classes=3)
    torch.manual_seed(0)
    explicit = densenet.create_model("densenet_bc16_k4", num_classes=3, spatial_dims=2)
    assert default.spatial_dims == 2 and default.config["spatial_dims"] == 2
    assert [type(m) for m in default.modules()] == [type(m) for m in explicit.modules()]
    torch.testing.assert_close(explicit.state_dict(), default.state_dict(), rtol=0, atol=0)
    assert all(value.dim() in (0, 1, 2, 4) for value in default.state_dict().values())
    assert OPS[2].conv is nn.Conv2d and OPS[2].batch_norm is nn.BatchNorm2d
    # A configuration written before volumes existed has no spatial_dims: it is 2D.
    config = dict(default.config)
    del config["spatial_dims"]
    assert densenet.models.DenseNet(**config).spatial_dims == 2


def test_invalid_and_unsupported_requests_say_what_to_do():
    with pytest.raises(ConfigError, match="spatial_dims must be 1 .signals., 2 .images. or 3 .volumes., got 4"):
        densenet.create_model("densenet_bc16_k4", spatial_dims=4)
    with pytest.raises(ConfigError, match="published ImageNet weights are 2D"):
        densenet.create_model("densenet121", pretrained=True, spatial_dims=3)
    with pytest.raises(ConfigError, match="torchvision's DenseNet is 2D only"):
        torchvision_reference(densenet.create_model("densenet_bc16_k4", spatial_dims=3))


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_weight_files_rebuild_1d_and_3d_models(tmp_path, spatial_dims):
    model = densenet.create_model("densenet_bc16_k4", spatial_dims=spatial_dims, in_chans=1, num_classes=2).eval()
    save_weights(model, tmp_path / "model.safetensors", {"classes": ["a", "b"]})
    loaded, meta = load_weights(tmp_path / "model.safetensors")  # from the metadata's config
    assert loaded.spatial_dims == spatial_dims and meta["config"]["spatial_dims"] == spatial_dims
    # Without metadata (a bare state dict, e.g. a checkpoint from elsewhere): from the first kernel's shape.
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    bare, _ = load_weights(tmp_path / "bare.pth")
    assert infer_config(model.state_dict())["spatial_dims"] == spatial_dims
    assert bare.config == model.config
    x = torch.randn(2, 1, *([16] * spatial_dims))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
        torch.testing.assert_close(bare.eval()(x), model(x))
