"""``densenet bench memory`` end to end with tiny sizes: JSON records, Markdown table and plot written."""

import json

import pytest
import torch

from densenet.bench.memory import build, check_modes, format_markdown, largest_batches
from densenet.cli import main
from densenet.errors import ConfigError


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path, capsys):
    results, markdown, plot = tmp_path / "m.json", tmp_path / "m.md", tmp_path / "m.png"
    argv = ["bench", "memory", "--depths", "10", "--growth-rate", "4", "--batch-size", "2", "--input-size",
            "8", "--threads", "1", "--repeats", "1", "--modes", "standard", "efficient",
            "--results", str(results), "--markdown", str(markdown), "--plot", str(plot)]
    assert main(argv) == 0
    records = json.loads(results.read_text())
    assert {(r["model"], r["mode"]) for r in records} == {
        (f"densenet_bc{d}_k4", m) for d in (10,) for m in ("standard", "efficient")}
    assert all(r["peak_mb"] >= 0 and r["live_mb"] >= 0 and r["seconds_per_step"] > 0 and r["batch"] == 2
               for r in records)
    table = markdown.read_text()
    assert "| densenet_bc10_k4 | 3x8^2 | cpu | 2 | ours, memory-efficient |" in table
    assert "densenet bench memory" in table
    assert "fp32 matmul peak" in table and all(len(r["matmul_peak_gflops"]) == 2 for r in records)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # A second run merges: its rows replace the same rows, others stay.
    assert main(argv[:3] + ["16"] + argv[4:] + ["--repeats", "0"]) == 0
    records = json.loads(results.read_text())
    assert len(records) == 4 and [r["seconds_per_step"] for r in records if "bc16" in r["model"]] == [None, None]


def test_bench_memory_rejects_bad_depth(tmp_path, capsys):
    assert main(["bench", "memory", "--depths", "11", "--results", str(tmp_path / "x.json")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_modes_build_what_they_name():
    # "standard" is the plain concatenation, each of our modes its block_impl, in any dimensionality.
    for mode, impl in (("standard", "plain"), ("concat_free", "concat_free"), ("efficient", "efficient")):
        model = build("densenet_bc10_k4", mode, spatial_dims=3, in_chans=1)
        assert model.block_impl == impl and model.spatial_dims == 3 and model.in_chans == 1
    pytest.importorskip("monai")
    from monai.networks.blocks.activation_checkpointing import ActivationCheckpointWrapper

    with torch.device("meta"):  # shapes only: fast
        plain, checkpointed = build("densenet121", "monai", 3, 1), build("densenet121", "monai-checkpoint", 3, 1)
    assert not any(isinstance(m, ActivationCheckpointWrapper) for m in plain.modules())
    assert sum(isinstance(m, ActivationCheckpointWrapper) for m in checkpointed.modules()) == 6 + 12 + 24 + 16
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in checkpointed.parameters())


def test_modes_that_cannot_build_are_refused_before_measuring():
    with pytest.raises(ConfigError, match="torchvision's DenseNet is 2D only"):
        check_modes(["densenet121"], ["standard", "torchvision"], 3)
    with pytest.raises(ConfigError, match="MONAI builds densenet121, .* not densenet_bc10_k4"):
        check_modes(["densenet_bc10_k4"], ["monai"], 3)
    check_modes(["densenet_bc10_k4"], ["standard", "concat_free", "efficient"], 1)


def test_largest_batch_is_extrapolated_from_two_batch_sizes():
    # Process RSS = 1000 MB + 500 MB per sample: 16 GB holds (16384 - 1000) / 500 = 30 samples.
    common = dict(model="densenet121", size=64, spatial_dims=3, in_chans=1, device="cpu", threads=2, live_mb=None,
                  seconds_per_step=None, command="c", date="d", mode="standard")
    records = [dict(common, batch=b, before_mb=400.0, peak_mb=600.0 + 500 * b) for b in (2, 4)]
    records.append(dict(common, batch=2, mode="efficient", before_mb=400.0, peak_mb=300.0))  # one batch: no line
    (fit,) = largest_batches(records)
    assert fit["mode"] == "standard" and fit["largest_batch"] == 30 and round(fit["per_sample_mb"]) == 500
    table = format_markdown(records)
    assert "| densenet121 | 1x64^3 | cpu | standard" not in table  # labels, not mode names
    assert "| densenet121 | 1x64^3 | cpu | ours, standard | 500 | 1000 | 2, 4 | 30 |" in table


@pytest.mark.slow
def test_bench_memory_3d_with_monai(tmp_path, capsys):
    pytest.importorskip("monai")
    results = tmp_path / "m.json"
    argv = ["bench", "memory", "--models", "densenet121", "--spatial-dims", "3", "--in-chans", "1", "--input-size",
            "32", "--batch-size", "2", "--threads", "1", "--repeats", "0", "--no-live", "--results", str(results),
            "--markdown", str(tmp_path / "m.md"), "--plot", str(tmp_path / "m.png")]
    assert main(argv) == 0
    records = json.loads(results.read_text())
    assert [r["mode"] for r in records] == ["standard", "concat_free", "efficient", "monai-checkpoint", "monai"]
    assert all(r["spatial_dims"] == 3 and r["in_chans"] == 1 and r["peak_mb"] > 0 for r in records)
    assert "| densenet121 | 1x32^3 | cpu | 2 | MONAI standard |" in (tmp_path / "m.md").read_text()
    assert main(argv[:-6] + ["--modes", "torchvision"]) == 2
