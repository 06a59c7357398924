"""Every inference engine against eager on the same images; BN folding exact; the cache, the fallback, the scope."""

import sys
import tempfile

import pytest
import torch
from torch import nn

import densenet
from densenet.inference import ENGINES, build_engine, engines, fold_batchnorm

_PACKAGES = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino"], "onnxruntime-int8": ["onnxruntime"],
             "openvino-bf16": ["openvino"], "openvino-int8": ["openvino", "nncf"]}
REDUCED = ("onnxruntime-int8", "openvino-bf16", "openvino-int8")  # approximate by design


def _trained_like(name: str = "densenet_bc16_k4", **overrides) -> densenet.DenseNet:
    torch.manual_seed(0)
    model = densenet.create_model(name, **overrides)
    with torch.no_grad():  # running statistics and BN parameters as after training, not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _needs(engine: str) -> None:
    for package in _PACKAGES.get(engine, []):
        pytest.importorskip(package)


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


@pytest.mark.parametrize("engine", [e for e in ENGINES if e not in REDUCED])
def test_float_engines_match_eager_on_the_same_images(engine):
    if engine == "compile":
        pytest.skip("compile: its own test, marked slow")
    _needs(engine)
    model = _trained_like()
    x = torch.randn(5, 3, 16, 16)
    run = build_engine(model, engine, example=x)
    assert run.name == engine and run.build_seconds >= 0
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run(x), expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(run(x[:1]), expected[:1], rtol=1e-3, atol=1e-4)  # another batch size
    torch.testing.assert_close(run(torch.cat([x, x])), torch.cat([expected, expected]), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_compile_matches_eager_and_keeps_freezing_to_itself():
    import torch._inductor.config as inductor_config

    model = _trained_like()
    x = torch.randn(4, 3, 16, 16)
    run = build_engine(model, "compile", example=x)
    assert not inductor_config.freezing  # an option of that compilation, not the process's setting
    with torch.no_grad():
        expected = model(torch.cat([x, x[:3]]))
    torch.testing.assert_close(run(torch.cat([x, x[:3]])), expected, rtol=1e-3, atol=1e-4)  # split and padded


@pytest.mark.parametrize("engine", REDUCED)
def test_reduced_precision_engines_are_close_to_eager_on_the_same_images(engine):
    _needs(engine)
    model = _trained_like()
    torch.manual_seed(1)
    calibration = torch.randn(32, 3, 16, 16)
    x = calibration[:8]
    run = build_engine(model, engine, example=x, calibration=calibration)
    with torch.no_grad():
        expected = model(x)
    got = run(x)
    assert got.shape == expected.shape
    # int8 and bf16 are approximate: the logits keep their direction and most of the arg-max decisions.
    cosine = nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.95
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino-int8"])
def test_built_files_are_cached_and_nothing_temporary_is_left(engine, tmp_path, monkeypatch):
    _needs(engine)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DENSENET_ENGINE_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model, x = _trained_like(), torch.randn(2, 3, 16, 16)
    first = build_engine(model, engine, example=x)
    second = build_engine(model, engine, example=x)
    assert not first.from_cache and second.from_cache
    assert [p.name.split("-")[0] for p in cache.iterdir()] == [engine.split("-")[0]]  # one folder, no leftovers
    torch.testing.assert_close(second(x), first(x))
    other = _trained_like()
    with torch.no_grad():
        other.classifier.bias.add_(1.0)
    assert not build_engine(other, engine, example=x).from_cache  # other weights, another entry
    uncached = build_engine(model, engine, example=x, cache=False)
    assert not uncached.from_cache
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary folder went with the build


def test_auto_falls_back_and_says_why(monkeypatch):
    model, x = _trained_like(), torch.randn(2, 3, 16, 16)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    run = build_engine(model, "auto", example=x)
    assert run.name == "eager"
    assert "openvino" in run.note and "onnxruntime" in run.note and run.note.endswith("ran eager")
    with pytest.raises(densenet.ConfigError, match=r"pip install 'densenet-paper\[openvino\]'"):
        build_engine(model, "openvino", example=x)


def test_auto_takes_the_first_installed_engine_of_its_order():
    model, x = _trained_like(), torch.randn(2, 3, 16, 16)
    first = next(e for e in engines.AUTO_ORDER if all(_installed(p) for p in _PACKAGES.get(e, [])))
    run = build_engine(model, "auto", example=x)
    assert run.name == first and run.note == ""
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=1e-3, atol=1e-4)


def _installed(package: str) -> bool:
    from importlib.util import find_spec

    return find_spec(package) is not None


def test_unknown_engine_is_a_config_error():
    with pytest.raises(densenet.ConfigError, match="unknown inference engine"):
        build_engine(_trained_like(), "tensorrt", example=torch.randn(1, 3, 16, 16))
