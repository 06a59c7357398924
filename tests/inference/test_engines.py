"""Inference engines against the eager model: BN folding exact, ONNX Runtime close, int8 close on tiny data."""

import pytest
import torch
from torch import nn

import densenet
from densenet.inference import build_engine, fold_batchnorm


def _trained_like(name: str = "densenet_bc16_k4", **overrides) -> densenet.DenseNet:
    torch.manual_seed(0)
    model = densenet.create_model(name, **overrides)
    with torch.no_grad():  # running statistics and BN parameters as after training, not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["densenet_bc16_k4", "densenet16_k4"])
def test_folding_keeps_the_outputs(name):
    model = _trained_like(name)
    folded = fold_batchnorm(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    if model.bottleneck_width:
        expected -= sum(len(b) for b in model.dense_blocks())  # one norm2 folded per bottleneck layer
    assert len(bns) == expected
    assert model.features.denseblock1.denselayer1.conv1.bias is None if model.bottleneck_width else True


def test_folding_the_imagenet_stem():
    model = _trained_like("densenet121", num_classes=10)
    folded = fold_batchnorm(model)
    assert isinstance(folded.features.norm0, nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("engine", ["folded", "onnxruntime"])
def test_float_engines_match_eager(engine):
    model = _trained_like()
    x = torch.randn(5, 3, 16, 16)
    run = build_engine(model, engine, example=x)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(run(x), expected, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(run(x[:1]), expected[:1], rtol=1e-3, atol=1e-4)  # the batch axis is dynamic


def test_int8_engine_is_close_to_float():
    model = _trained_like()
    torch.manual_seed(1)
    calibration = torch.randn(32, 3, 16, 16)
    x = calibration[:8]
    run = build_engine(model, "onnxruntime-int8", example=x, calibration=calibration)
    with torch.no_grad():
        expected = model(x)
    got = run(x)
    assert got.shape == expected.shape
    # int8 is approximate: the logits keep their direction and most of the arg-max decisions.
    cosine = nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.95
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


def test_unknown_engine_is_a_config_error():
    with pytest.raises(densenet.ConfigError, match="unknown inference engine"):
        build_engine(_trained_like(), "tensorrt", example=torch.randn(1, 3, 16, 16))
