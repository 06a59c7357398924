"""The networks of the paper, checked against its tables and against torchvision's implementation."""

import pytest
import torch
import torchvision
from torch import nn

import densenet
from densenet.analysis.complexity import count_macs, count_parameters
from densenet.models import remap_legacy_keys

# Table 2 (10 classes), rounded to 0.1M as the paper prints them.
TABLE2_PARAMS_M = {
    "densenet40_k12": 1.0,
    "densenet100_k12": 7.0,
    "densenet100_k24": 27.2,
    "densenet_bc100_k12": 0.8,
    "densenet_bc250_k24": 15.3,
    "densenet_bc190_k40": 25.6,
}
# Table 1 (1000 classes), exact.
TABLE1_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264": 33_337_704,
}


def meta_model(name, **kw):
    with torch.device("meta"):
        return densenet.create_model(name, **kw)


@pytest.mark.parametrize("name", list(TABLE2_PARAMS_M))
def test_cifar_parameters_match_table2(name):
    assert round(count_parameters(meta_model(name)) / 1e6, 1) == TABLE2_PARAMS_M[name]


@pytest.mark.parametrize("name", list(TABLE1_PARAMS))
def test_imagenet_parameters_match_table1(name):
    assert count_parameters(meta_model(name)) == TABLE1_PARAMS[name]


def test_list_models_is_the_paper():
    assert set(densenet.list_models()) == set(TABLE1_PARAMS) | set(TABLE2_PARAMS_M)


@pytest.mark.slow
@pytest.mark.parametrize("name, gmacs", [("densenet121", 2.83), ("densenet169", 3.36), ("densenet201", 4.29),
                                         ("densenet264", 5.75), ("densenet161", 7.73),
                                         ("densenet_bc100_k12", 0.29), ("densenet_bc250_k24", 5.4),
                                         ("densenet_bc190_k40", 9.3)])
def test_macs_match_paper(name, gmacs):
    decimals = len(str(gmacs).split(".")[1])  # compare at the precision the paper prints
    macs = count_macs(meta_model(name)) / 1e9
    assert round(macs, decimals) == pytest.approx(gmacs), macs


@pytest.mark.slow
@pytest.mark.parametrize("name", densenet.list_models())
def test_feature_info_of_every_model(name):
    """Channels and strides per block follow from the configuration (shape-only copy, no forward)."""
    model = meta_model(name)
    channels = model.features.conv0.out_channels
    reduction = 4 if model.stem == "imagenet" else 1
    for i, (n, info) in enumerate(zip(model.block_config, model.feature_info)):
        channels += n * model.growth_rate
        assert (info["num_chs"], info["reduction"]) == (channels, reduction)
        channels, reduction = int(channels * model.compression), reduction * 2
    assert model.feature_info[-1]["module"] == "features.norm5"


@pytest.mark.parametrize("name", ["densenet40_k12", "densenet_bc100_k12", "densenet121"])
def test_feature_shapes(name):
    """forward_intermediates gives one map per block with feature_info's channels and strides."""
    model = densenet.create_model(name).eval()
    size = 64 if model.stem == "imagenet" else 16  # small inputs: the shapes scale, the cost does not
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        logits = model.forward_head(feats[-1])
        pooled = model.forward_head(feats[-1], pre_logits=True)
    assert len(feats) == len(model.block_config) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (1, info["num_chs"], size // info["reduction"], size // info["reduction"])
    assert pooled.shape == (1, model.num_features)
    assert logits.shape == (1, model.num_classes)
    torch.testing.assert_close(logits, model(x))


def test_tiny_forward_backward_and_modules():
    model = densenet.create_model("densenet_bc16_k4", num_classes=7, in_chans=1, drop_rate=0.2)
    x = torch.randn(3, 1, 12, 12)
    out = model(x)
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # The paper's composition: 2 layers per block, bottleneck 4k, compression 0.5, stem 2k.
    block = model.features.denseblock1
    assert len(block) == 2 and model.features.conv0.out_channels == 8
    assert block.denselayer2.conv1.in_channels == 12 and block.denselayer2.conv1.out_channels == 16
    assert model.features.transition1.conv.out_channels == (8 + 2 * 4) // 2
    # Dropout after every convolution but the first: bottleneck, 3x3 and transition.
    assert isinstance(model.features.transition1.drop, nn.Dropout)


def test_basic_layer_has_no_bottleneck():
    model = meta_model("densenet40_k12")
    layer = model.features.denseblock2.denselayer3
    assert not hasattr(layer, "conv1") and layer.conv2.kernel_size == (3, 3)
    assert layer.conv2.in_channels == 16 + 12 * 12 + 2 * 12  # no compression: all maps pass the transition
    assert model.features.conv0.out_channels == 16 and model.features.conv0.kernel_size == (3, 3)


def test_initialisation_is_the_papers():
    model = densenet.create_model("densenet_bc40_k12")
    conv = model.features.denseblock2.denselayer1.conv2
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)
    bn = model.features.denseblock1.denselayer1.norm1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.classifier.bias == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "densenet161"])
def test_torchvision_state_dict_and_logits(name):
    torch.manual_seed(1)
    reference = getattr(torchvision.models, name)().eval()
    ours = densenet.create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


def test_cifar_bc_matches_torchvision_with_cifar_stem():
    reference = torchvision.models.DenseNet(growth_rate=6, block_config=(3, 3, 3), num_init_features=12,
                                            bn_size=4, num_classes=10)
    reference.features.conv0 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
    del reference.features.norm0, reference.features.relu0, reference.features.pool0
    ours = densenet.create_model("densenet_bc22_k6")
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.train(), ours.train()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


def test_legacy_2017_keys_load():
    model = densenet.create_model("densenet_bc16_k4")
    legacy = {}
    for key, value in model.state_dict().items():
        for part in ("norm1", "conv1", "norm2", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy["module." + key] = value.clone() + 1
    assert any(".norm.1." in k for k in legacy)
    fresh = densenet.create_model("densenet_bc16_k4")
    densenet.load_state_dict_compat(fresh, legacy)
    assert torch.equal(fresh.features.denseblock1.denselayer1.conv1.weight,
                       model.features.denseblock1.denselayer1.conv1.weight + 1)
    assert "features.norm5.weight" in remap_legacy_keys({"module.features.norm5.weight": 0})


def test_reset_classifier_and_overrides():
    model = densenet.create_model("densenet_bc16_k4", num_classes=5)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, model.num_features)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="densenet_bc101_k12"), "depth 101 is not 6n+4 for a DenseNet-BC; nearest: 100, 106"),
    (dict(name="densenet41_k12"), "depth 41 is not 3n+4 for a DenseNet; nearest: 40, 43"),
    (dict(name="densenet_bc100_k12", growth_rate=0), "growth_rate must be a positive integer"),
    (dict(name="densenet_bc100_k12", growth_rate=-3), "growth_rate must be a positive integer"),
    (dict(name="densenet_bc100_k12", compression=0.0), "compression must be in (0, 1]"),
    (dict(name="densenet_bc100_k12", compression=1.5), "compression must be in (0, 1]"),
    (dict(name="densenet_bc100_k12", drop_rate=1.0), "drop_rate must be in [0, 1)"),
    (dict(name="densenet_bc100_k12", num_classes=-1), "num_classes must be >= 0"),
    (dict(name="densenet_bc100_k12", pretrained=True), "no published ImageNet weights for 'densenet_bc100_k12'"),
    (dict(name="densenet12"), "unknown model 'densenet12'; did you mean"),
    (dict(name="resnet50"), "choose from densenet40_k12"),
])
def test_bad_configurations_raise_value_error(kwargs, message):
    with pytest.raises(ValueError) as info:
        densenet.create_model(**kwargs)
    assert message in str(info.value)


def test_config_rebuilds_the_same_network():
    model = densenet.create_model("densenet_bc16_k4", num_classes=3, in_chans=1)
    rebuilt = densenet.DenseNet(**model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.config == model.config


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_strided_stem_halves_the_side_and_is_counted(spatial_dims):
    """stem="strided": one 3x3 convolution of stride 2; the same parameters as the CIFAR stem, the first block at
    half the side (feature_info's reductions 2, 4, 8), and complexity.config_macs equal to torch's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from densenet.analysis.complexity import config_macs

    strided = densenet.create_model("densenet_bc22_k6", stem="strided", in_chans=1, spatial_dims=spatial_dims)
    cifar = densenet.create_model("densenet_bc22_k6", in_chans=1, spatial_dims=spatial_dims)
    assert strided.features.conv0.stride == (2,) * spatial_dims
    assert [p.shape for p in strided.parameters()] == [p.shape for p in cifar.parameters()]
    assert [info["reduction"] for info in strided.feature_info] == [2, 4, 8]
    x = torch.randn(2, 1, *[14] * spatial_dims)
    assert strided.forward_intermediates(x)[0].shape[2:] == (7,) * spatial_dims
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        strided.eval()(x[:1])
    assert config_macs(strided.config, 14) == counter.get_total_flops() // 2
    assert config_macs(strided.config, 14) < config_macs(cifar.config, 14) / 4


def test_strided_stem_matches_torchvision_with_a_strided_first_convolution():
    from densenet.models.compat import torchvision_reference

    ours = densenet.create_model("densenet_bc22_k6", stem="strided").eval()
    reference = torchvision_reference(ours).eval()
    assert reference.features.conv0.stride == (2, 2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)
