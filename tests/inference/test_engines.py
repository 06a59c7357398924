"""Every inference engine against eager on the same images; BN folding exact; the cache, the fallback, the scope."""

import sys
import tempfile

import pytest
import torch
from torch import nn

import densenet
from densenet.devices import native_bf16
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    run = build_engine(model, "auto", example=x)
    assert run.name == "eager"
    assert run.note.startswith("openvino-bf16 is not installed")
    assert "onnxruntime" in run.note and run.note.endswith("ran eager")
    with pytest.raises(densenet.ConfigError, match=r"pip install 'densenet-paper\[openvino\]'"):
        build_engine(model, "openvino", example=x)


def test_auto_tries_bf16_first_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    assert engines.auto_order(cpu) == ("openvino-bf16", "openvino", "onnxruntime", "eager")
    assert engines.auto_order(torch.device("cuda")) == ("eager",)
    monkeypatch.setattr(engines, "native_bf16", lambda device: False)
    assert engines.auto_order(cpu) == engines.AUTO_ORDER == ("openvino", "onnxruntime", "eager")


def test_auto_is_bf16_on_a_native_bf16_cpu(monkeypatch):
    _needs("openvino-bf16")
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    model, x = _trained_like(), torch.randn(8, 3, 16, 16)
    run = build_engine(model, "auto", example=x)
    assert run.name == "openvino-bf16" and run.note == ""
    with torch.no_grad():
        expected = model(x)
    assert engines.disagreement("openvino-bf16", run(x), expected) is None
    if native_bf16(torch.device("cpu")):  # really bf16 (elsewhere OpenVINO may compute in fp32)
        assert (run(x) - expected).abs().max() > 1e-4


def test_auto_is_fp32_and_exact_without_native_bf16(monkeypatch):
    monkeypatch.setattr(engines, "native_bf16", lambda device: False)
    model, x = _trained_like(), torch.randn(4, 3, 16, 16)
    first = next(e for e in engines.AUTO_ORDER if all(_installed(p) for p in _PACKAGES.get(e, [])))
    run = build_engine(model, "auto", example=x)
    assert run.name == first and run.note == ""
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_auto_falls_back_to_fp32_when_bf16_fails_its_check(monkeypatch):
    _needs("openvino")
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    model, x = _trained_like(), torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(engines, "BF16_TOLERANCE", 0.0)  # bf16 rounding now counts as straying
    run = build_engine(model, "auto", example=x)
    assert run.name == "openvino"
    assert run.note.startswith("openvino-bf16 strayed") and run.note.endswith("ran openvino")
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=1e-3, atol=1e-4)

    from densenet.inference import runtimes

    openvino_runner = runtimes.openvino_runner

    def broken_bf16(path, threads, cache_dir=None, precision="f32"):
        if precision == "bf16":
            raise RuntimeError("no bf16 kernels for this graph\nsecond line")
        return openvino_runner(path, threads, cache_dir, precision)

    monkeypatch.setattr(runtimes, "openvino_runner", broken_bf16)
    run = build_engine(model, "auto", example=x)
    assert run.name == "openvino" and run.note == "openvino-bf16 failed (no bf16 kernels for this graph); ran openvino"


def test_the_bf16_check_wants_the_top_class_kept_and_the_logits_close():
    expected = torch.tensor([[4.0, 1.0, 0.0], [0.0, 2.0, 1.99], [1.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
    assert engines.disagreement("openvino-bf16", expected + 0.01, expected) is None
    assert engines.disagreement("openvino", expected + 0.01, expected) == "openvino strayed 1.0e-02 from eager"
    assert "strayed" in engines.disagreement("openvino-bf16", expected + 0.5, expected)  # 0.5 > 5% of 5
    # within the tolerance, but the top class of one image in four changed: 75% kept, 90% needed
    flipped = expected.clone()
    flipped[1, 2] = 2.01
    assert engines.disagreement("openvino-bf16", flipped, expected) == (
        "openvino-bf16 kept eager's top class on 75% of 4 images")
    # a diverged network: NaN would pass any "difference <= tolerance" test
    broken = expected.clone()
    broken[0, 0] = float("nan")
    assert engines.disagreement("openvino", broken, expected) == "openvino not used: openvino gave non-finite logits"
    assert engines.disagreement("openvino-bf16", expected, broken) == (
        "openvino-bf16 not used: eager gave non-finite logits")


def _installed(package: str) -> bool:
    from importlib.util import find_spec

    return find_spec(package) is not None


def test_unknown_engine_is_a_config_error():
    with pytest.raises(densenet.ConfigError, match="unknown inference engine"):
        build_engine(_trained_like(), "tensorrt", example=torch.randn(1, 3, 16, 16))


@pytest.mark.slow
def test_the_cache_keeps_the_most_recently_used_engines(tmp_path, monkeypatch):
    import os
    import time

    _needs("onnxruntime")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DENSENET_ENGINE_CACHE", str(cache))
    monkeypatch.setattr(engines, "CACHE_ENTRIES", 2)
    x = torch.randn(2, 3, 16, 16)
    models = []
    for shift in range(3):
        model = _trained_like()
        with torch.no_grad():
            model.classifier.bias.add_(shift)  # other weights: another cache entry
        models.append(model)
    hour_ago = time.time() - 3600

    def folders():
        return {p.name for p in cache.iterdir()}

    build_engine(models[0], "onnxruntime", example=x)
    (first,) = folders()
    os.utime(cache / first, (hour_ago, hour_ago))  # built an hour ago
    build_engine(models[1], "onnxruntime", example=x)
    (second,) = folders() - {first}
    os.utime(cache / second, (hour_ago + 60, hour_ago + 60))  # and this a minute later
    assert build_engine(models[0], "onnxruntime", example=x).from_cache  # used again: now the most recent
    stale = cache / ".onnxruntime-abandoned"  # a build whose process died two days ago
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    fresh = cache / ".onnxruntime-building"  # another process building right now
    fresh.mkdir()
    build_engine(models[2], "onnxruntime", example=x)
    assert first in folders() and second not in folders()  # the least recently used went
    assert len(folders() - {fresh.name}) == 2
    # one used in the last ten minutes stays, over the bound: another process may be loading it
    os.utime(cache / first, (time.time() - 120,) * 2)
    build_engine(models[1], "onnxruntime", example=x)
    assert len(folders() - {fresh.name}) == 3
    assert fresh.exists() and not stale.exists()
    assert build_engine(models[0], "onnxruntime", example=x).from_cache
    assert build_engine(models[2], "onnxruntime", example=x).from_cache
