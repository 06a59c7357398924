"""``densenet bench speed`` with tiny sizes: the report's structure, and ratios computed from measured times."""

import json

import pytest
import torch
import torchvision

import densenet
from densenet.bench.speed import Timing
from densenet.cli import main
from densenet.models.compat import torchvision_reference


def test_bench_speed_json_report(capsys):
    code = main(["bench", "speed", "--model", "densenet_bc16_k4", "--input-size", "8", "--batch-size", "4",
                 "--infer-batch-size", "4", "--repeats", "3", "--warmup", "0", "--matmul-size", "256", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "densenet_bc16_k4" and report["input_size"] == 8
    assert report["matmul_peak_flops"] > 1e8
    assert [r["task"] for r in report["results"]] == ["train", "infer", "latency"]
    assert [r["batch_size"] for r in report["results"]] == [4, 4, 1]
    for r in report["results"]:
        for side in ("ours", "torchvision"):
            t = r[side]
            assert len(t["samples"]) == 3 and all(s > 0 for s in t["samples"])
            assert t["min_s"] <= t["q1_s"] <= t["median_s"] <= t["q3_s"] <= t["max_s"]
            assert t["images_per_s"] == pytest.approx(r["batch_size"] / t["median_s"])
            assert t["peak_fraction"] == pytest.approx(t["flops_per_s"] / report["matmul_peak_flops"])
        assert r["ratio"] == pytest.approx(r["torchvision"]["median_s"] / r["ours"]["median_s"])
        rounds = sorted(t / o for o, t in zip(r["ours"]["samples"], r["torchvision"]["samples"], strict=True))
        assert r["paired_ratio"] == pytest.approx([rounds[1], rounds[0], rounds[2]])
    train = report["results"][0]["ours"]
    assert train["flops"] == 3 * 2 * report["macs_per_image"] * 4


def test_bench_speed_markdown_with_an_engine(capsys):
    code = main(["bench", "speed", "--model", "densenet_bc16_k4", "--input-size", "8", "--tasks", "latency",
                 "--repeats", "1", "--warmup", "0", "--engine", "folded", "--channels-last",
                 "--matmul-size", "256"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| latency | 1 |" in out and "channels_last" in out and "engine folded" in out


def test_models_without_a_torchvision_twin_are_a_clear_error(capsys):
    assert main(["bench", "speed", "--model", "densenet40_k12", "--repeats", "1"]) == 2
    assert "torchvision's DenseNet has bottleneck layers" in capsys.readouterr().err


def test_reference_is_torchvisions_class_with_our_weights():
    ours = densenet.create_model("densenet_bc16_k4")
    reference = torchvision_reference(ours)
    assert isinstance(reference, torchvision.models.DenseNet)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), ours.eval()(x), rtol=1e-4, atol=1e-5)


def test_timing_summary():
    t = Timing([4.0, 1.0, 2.0, 3.0, 5.0], images=10, flops=100.0).summarise(peak_flops=1000.0)
    assert (t.min_s, t.median_s, t.max_s) == (1.0, 3.0, 5.0)
    assert t.images_per_s == pytest.approx(10 / 3) and t.peak_fraction == pytest.approx(100 / 3 / 1000)


def test_bench_paths_row_for_the_default_training_path(capsys, monkeypatch):
    """The "paths" task: our default training path beside torchvision's eager and compiled settings. torch.compile
    is replaced by the identity here (the suite stays eager; tests/training/test_fast_path.py checks compiling)."""
    from dataclasses import replace

    from densenet.training import fast

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    timed = []  # densenet train times its candidate paths on a CPU; the bench's default row follows that choice

    def pick_eager_channels_last(model, runtime, shape, num_classes, batch_size, **kwargs):
        timed.append((shape, batch_size))
        return replace(runtime, compile=False, channels_last=True, timed=False, rates={"eager channels_last": 1.0})

    monkeypatch.setattr(fast, "time_paths", pick_eager_channels_last)
    code = main(["bench", "speed", "--model", "densenet_bc16_k4", "--input-size", "8", "--batch-size", "4",
                 "--tasks", "paths", "--repeats", "2", "--warmup", "0", "--matmul-size", "256", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    paths = report["paths"]
    assert list(paths["timings"]) == ["ours default", "ours eager NCHW", "ours eager channels_last",
                                      "torchvision eager NCHW", "torchvision eager channels_last",
                                      "torchvision compiled channels_last"]
    assert timed[0] == ((3, 8, 8), 4)
    # the timed choice, with the dense blocks densenet train runs on each path (fast.block_impl_for)
    assert paths["settings"]["ours default"] == {"channels_last": True, "compiled": False, "block_impl": "plain"}
    assert paths["settings"]["ours eager NCHW"] == {"channels_last": False, "compiled": False,
                                                    "block_impl": "concat_free"}
    assert paths["settings"]["torchvision eager NCHW"]["block_impl"] is None
    ips = {name: t["images_per_s"] for name, t in paths["timings"].items()}
    best = max(("torchvision eager NCHW", "torchvision eager channels_last"), key=ips.get)
    assert paths["best_torchvision_eager"] == best
    assert paths["default_vs_best_torchvision_eager"] == pytest.approx(ips["ours default"] / ips[best])
    assert paths["default_vs_ours_eager_nchw"] == pytest.approx(ips["ours default"] / ips["ours eager NCHW"])
    assert report["results"] == []
    assert main(["bench", "speed", "--model", "densenet_bc16_k4", "--input-size", "8", "--batch-size", "4",
                 "--tasks", "paths", "--repeats", "1", "--warmup", "0", "--matmul-size", "256"]) == 0
    assert "**ours default** (eager, channels_last)" in capsys.readouterr().out
