"""The comparison ResNets (models/resnet.py, pytorchcv's networks): published sizes, the registry, the training path."""

import builtins
import csv
import importlib.util

import pytest
import torch
import yaml

import densenet
from densenet.errors import ConfigError
from densenet.models import resnet
from densenet.models.registry import model_config

needs_pytorchcv = pytest.mark.skipif(importlib.util.find_spec("pytorchcv") is None,
                                     reason="pytorchcv is not installed (pip install densenet-paper[compare])")

# He et al. (2016a) Table 6 (option A: parameter-free shortcuts), 10 classes, in millions as printed.
PUBLISHED_PARAMS_M = {"resnet20_cifar": 0.27, "resnet32_cifar": 0.46, "resnet44_cifar": 0.66, "resnet56_cifar": 0.85,
                      "resnet110_cifar": 1.7}
# He et al. (2016b) Table 2 and the DenseNet paper's Figure 4: the pre-activation bottleneck ResNets.
PUBLISHED_PREACT_M = {"preresnet164_cifar": 1.7, "preresnet1001_cifar": 10.2}


def meta_model(name, **kw):
    with torch.device("meta"):
        return densenet.create_model(name, **kw)


@needs_pytorchcv
@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_basic_resnets_match_the_published_counts_but_for_the_projection_shortcuts(name):
    params = {k: p.numel() for k, p in meta_model(name).named_parameters()}
    shortcuts = sum(n for k, n in params.items() if ".identity_" in k)
    assert shortcuts == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64  # option B: two 1x1 convolutions with BN
    digits = 1 if PUBLISHED_PARAMS_M[name] >= 1 else 2  # as the paper prints them
    assert round((sum(params.values()) - shortcuts) / 1e6, digits) == PUBLISHED_PARAMS_M[name]


@needs_pytorchcv
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "preresnet1001_cifar" else [])
                                  for n in PUBLISHED_PREACT_M])  # 1001 layers: seconds even on the meta device
def test_preactivation_resnets_match_the_published_counts(name):
    params = sum(p.numel() for p in meta_model(name).parameters())
    assert params / 1e6 == pytest.approx(PUBLISHED_PREACT_M[name], rel=0.015)  # 1.70M; 10.33M against 10.2M


def test_every_published_network_is_named():
    assert {**PUBLISHED_PARAMS_M, **PUBLISHED_PREACT_M}.keys() == resnet.RESNETS.keys()


def test_depth_rule_and_forms():
    assert model_config("resnet56_cifar") == dict(arch="resnet", depth=56, bottleneck=False, in_chans=3,
                                                  num_classes=10, stem="cifar")
    assert model_config("preresnet164_cifar")["bottleneck"] is True
    assert model_config("resnet8_cifar")["depth"] == 8  # any 6n+2 builds
    assert model_config("resnet164_cifar")["bottleneck"] and not model_config("preresnet110_cifar")["bottleneck"]
    with pytest.raises(ConfigError, match="6n\\+2"):
        model_config("resnet21_cifar")
    with pytest.raises(ConfigError, match="9n\\+2"):
        model_config("preresnet165_cifar")


@needs_pytorchcv
def test_classes_channels_and_small_crops():
    model = densenet.create_model("resnet8_cifar", num_classes=7, in_chans=1).eval()
    assert model.config["num_classes"] == 7 and model.config["in_chans"] == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
        assert model(torch.randn(2, 1, 24, 24)).shape == (2, 7)  # --small-crop 24: global pooling
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    pre = densenet.create_model("preresnet8_cifar").eval()
    with torch.no_grad():
        assert pre(torch.randn(2, 3, 24, 24).contiguous(memory_format=torch.channels_last)).shape == (2, 10)


@needs_pytorchcv
def test_densenet_options_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="no dropout"):
        densenet.create_model("resnet20_cifar", drop_rate=0.2)
    with pytest.raises(ConfigError, match="memory-efficient"):
        densenet.create_model("resnet20_cifar", memory_efficient=True)
    with pytest.raises(ConfigError, match="growth_rate"):
        densenet.create_model("resnet20_cifar", growth_rate=12)
    with pytest.raises(ConfigError, match="pretrained"):
        densenet.create_model("resnet20_cifar", pretrained=True)
    densenet.create_model("resnet8_cifar", drop_rate=0.0, memory_efficient=False, block_impl=None)  # the defaults


def test_densenet_b_and_c_variants():
    b, c = model_config("densenet_b40_k12"), model_config("densenet_c40_k12")
    assert (b["bottleneck_width"], b["compression"], b["num_init_features"]) == (4, 1.0, 24)
    assert (c["bottleneck_width"], c["compression"], c["num_init_features"]) == (None, 0.5, 16)
    assert b["block_config"] == (6, 6, 6) and c["block_config"] == (12, 12, 12)
    with pytest.raises(ConfigError, match="6n\\+4"):
        model_config("densenet_b41_k12")


def test_a_missing_pytorchcv_is_one_line_naming_the_extra(monkeypatch):
    real = builtins.__import__

    def no_pytorchcv(name, *args, **kwargs):
        if name.startswith("pytorchcv"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pytorchcv)
    with pytest.raises(ConfigError) as info:
        densenet.create_model("resnet20_cifar")
    assert str(info.value) == resnet.INSTALL_HINT and "pip install densenet-paper[compare]" in str(info.value)


@needs_pytorchcv
@pytest.mark.slow  # about 20 s on a busy 2-core machine
def test_a_resnet_trains_through_the_library_path(tmp_path):
    """densenet train --model resnet8_cifar: the data, recipe, fast path and run folder of a DenseNet run."""
    from densenet.cli import main
    from densenet.models.weights import read_metadata

    run = tmp_path / "run"
    assert main(["train", "--model", "resnet8_cifar", "--epochs", "1", "--batch-size", "256", "--quiet",
                 "--threads", "1", "--device", "cpu", "--out", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "resnet8_cifar" and "runtime" in config
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0 <= float(rows[0]["test_error"]) < 90  # learnt something from the digits
    meta = read_metadata(run / "model.safetensors")
    assert meta["config"] == dict(arch="resnet", depth=8, bottleneck=False, in_chans=1, num_classes=10, stem="cifar")
    assert config["runtime"]["block_impl"] is None  # no dense blocks to choose an implementation for
    # every downstream command takes the run as it takes a DenseNet's
    assert main(["evaluate", str(run), "--engine", "eager", "--device", "cpu"]) == 0
    assert main(["report", str(run)]) == 0
    assert main(["summary", "resnet8_cifar"]) == 0

