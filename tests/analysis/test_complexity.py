"""The parameter and MAC counts computed from a configuration, against the built network itself."""

import pytest
import torch
from torch import nn

import densenet
from densenet.analysis.complexity import config_macs, config_parameters, count_parameters
from densenet.models.registry import model_config

CONFIGS = [model_config(name) for name in densenet.list_models()] + [
    dict(growth_rate=4, block_config=[2, 3], bottleneck_width=None, compression=0.5, stem="cifar", num_classes=7),
    dict(growth_rate=6, block_config=[1, 2, 1], bottleneck_width=2, compression=0.7, stem="imagenet", in_chans=1,
         num_classes=0),
    dict(growth_rate=5, block_config=[3], bottleneck_width=4, compression=1.0, stem="cifar", num_init_features=9),
]


def hooked_macs(model: nn.Module, size: int) -> int:
    """The oracle: every convolution's output elements times its kernel volume, plus the linear layer's."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            total[0] += output.numel() * module.weight[0].numel()
        else:
            total[0] += output.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.empty(1, model.in_chans, size, size, device="meta"))
    return total[0]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"k{c['growth_rate']}-{c['stem']}-{c['block_config']}")
def test_counts_from_the_configuration_equal_the_built_network(config):
    with torch.device("meta"):
        model = densenet.DenseNet(**config)
    assert config_parameters(config) == count_parameters(model)
    for size in ([224, 225, 97] if model.stem == "imagenet" else [32, 8, 33]):
        assert config_macs(config, size) == hooked_macs(model, size), size


@pytest.mark.slow
def test_densenet_list_prints_the_counts_of_the_built_models(capsys):
    from densenet.cli import main

    assert main(["list", "--num-classes", "100"]) == 0
    from densenet.models.resnet import RESNETS

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("comparison networks") and all(name in lines[-1] for name in RESNETS)
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert list(rows) == densenet.list_models()
    for name, (_, form, size, classes, params, macs) in rows.items():
        with torch.device("meta"):
            model = densenet.create_model(name, num_classes=100)
        assert (form, int(size), int(classes)) == (model.stem, 224 if form == "imagenet" else 32, 100)
        assert int(params.replace(",", "")) == count_parameters(model)
        assert macs == f"{hooked_macs(model, int(size)) / 1e9:.2f}G"


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [1, 3])
@pytest.mark.parametrize("name", ["densenet_bc40_k12", "densenet121"])
def test_counts_of_1d_and_3d_configs_equal_the_built_networks(name, spatial_dims):
    """Parameters against the built network; MACs against torch's operator count of one forward pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from densenet.models.registry import create_model, model_config

    size = 32
    config = model_config(name) | {"spatial_dims": spatial_dims, "num_classes": 5, "in_chans": 1}
    with torch.device("meta"):
        model = create_model(name, spatial_dims=spatial_dims, num_classes=5, in_chans=1).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 1, *[size] * spatial_dims))
    assert config_parameters(config) == sum(p.numel() for p in model.parameters())
    assert config_macs(config, size) == counter.get_total_flops() // 2
