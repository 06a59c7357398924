"""densenet analyze figure4 over run folders written by the training code's own writers (config.yaml, metrics.csv)."""

import importlib.util

import pytest
import torch

from densenet.analysis import figure4
from densenet.analysis.complexity import config_macs, config_parameters
from densenet.cli import main
from densenet.errors import DenseNetError
from densenet.models.registry import model_config
from densenet.training.options import TrainOptions
from densenet.training.run_folder import write_config, write_metrics
from tests.helpers import assert_user_error, run_cli

needs_pytorchcv = pytest.mark.skipif(importlib.util.find_spec("pytorchcv") is None,
                                     reason="pytorchcv is not installed (pip install densenet-paper[compare])")
RECIPE = dict(dataset="cifar10", epochs=4, batch_size=128, lr=0.4, schedule="onecycle", eval_every=2)


def make_run(folder, model, test_errors, seconds=60.0, log_images=None, **recipe):
    """A run folder as densenet train leaves it: config.yaml (with runtime) and metrics.csv; None: not evaluated."""
    folder.mkdir(parents=True, exist_ok=True)
    options = TrainOptions(**(RECIPE | recipe | {"model": model, "out": str(folder)})).to_dict()
    write_config(folder, options | {"runtime": {"compile": True, "channels_last": True, "threads": 2}})
    history = []
    for epoch, error in enumerate(test_errors, start=1):
        row = {"epoch": epoch, "lr": 0.1, "train_loss": 2.0 / epoch, "train_error": 50.0 / epoch, "seconds": seconds}
        if error is not None:
            row |= {"test_error": error, "test_top5_error": 1.0}
        history.append(row)
    write_metrics(folder, history)
    if log_images:
        (folder / "train.log").write_text(f"training {model} on cifar10 ({log_images} images, 10 classes) for "
                                          f"{len(test_errors)} epochs on cpu -> {folder}\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [make_run(root / "bc40", "densenet_bc40_k12", [None, 30.0, None, 20.0], seconds=120.0),
            make_run(root / "bc64", "densenet_bc64_k12", [None, 28.0, None, 18.0]),
            make_run(root / "dn40", "densenet40_k12", [None, 29.0, None, 19.5]),
            make_run(root / "c40", "densenet_c40_k12", [None, 31.0, None, 21.0]),
            make_run(root / "r20", "resnet20_cifar", [None, 33.0, None, 24.0], seconds=30.0, log_images=1000),
            make_run(root / "r56", "resnet56_cifar", [None, 27.0, None, 18.5])]


@pytest.mark.slow
def test_the_generic_macs_counter_agrees_with_the_papers_count_on_densenets():
    for name in ("densenet_bc40_k12", "densenet40_k12", "densenet_c40_k12", "densenet_b40_k12"):
        config = model_config(name)
        size = 224 if config["stem"] == "imagenet" else 32
        params, macs = figure4.network_cost(name, config["num_classes"], 3, size)
        assert (params, macs) == (config_parameters(config), config_macs(config, size)), name


@needs_pytorchcv
def test_a_resnets_macs_are_its_convolutions_and_linear_layer():
    # ResNet-20: stem 3->16 at 32x32, 6 convs 16->16 at 32x32, 32-wide at 16x16 and 64-wide at 8x8 (the first of
    # each a stride-2 conv from half the width plus a 1x1 projection), the 64->10 linear layer.
    expected = (3 * 16 * 9 * 32 * 32 + 6 * 16 * 16 * 9 * 32 * 32
                + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32) * 16 * 16
                + (32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64) * 8 * 8 + 64 * 10)
    assert figure4.network_cost("resnet20_cifar", 10, 3, 32) == (272_474, expected)


def test_families_and_labels():
    cases = {"densenet_bc40_k12": ("DenseNet-BC", "BC L=40 k=12"), "densenet_b40_k12": ("DenseNet-B", "B L=40 k=12"),
             "densenet_c40_k12": ("DenseNet-C", "C L=40 k=12"), "densenet40_k12": ("DenseNet", "L=40 k=12"),
             "resnet56_cifar": ("ResNet", "ResNet-56"),
             "preresnet1001_cifar": ("pre-act ResNet", "pre-act ResNet-1001")}
    for name, expected in cases.items():
        config = model_config(name)
        assert (figure4.family(config), figure4.label(name, config)) == expected


@needs_pytorchcv
def test_a_run_folder_gives_its_point(runs):
    bc40 = figure4.read_run(runs[0])
    assert (bc40.model, bc40.family, bc40.epochs_done, bc40.finished) == ("densenet_bc40_k12", "DenseNet-BC", 4, True)
    assert bc40.test_error == 20.0 and bc40.minutes == pytest.approx(8.0)
    assert bc40.params == 176_122 and bc40.macs == config_macs(model_config("densenet_bc40_k12"))
    assert bc40.images_per_second == pytest.approx(50_000 * 4 / 480)  # CIFAR-10's 50,000 per epoch
    r20 = figure4.read_run(runs[4])
    assert r20.images_per_second == pytest.approx(1000 * 4 / 120)  # the count train.log gives
    partial = figure4.read_run(make_run(runs[0].parent / "partial", "densenet_bc40_k12", [None, 25.0], epochs=4))
    assert (partial.epochs_done, partial.finished, partial.test_error) == (2, False, 25.0)
    assert "| densenet_bc40_k12 (partial) | DenseNet-BC |" in figure4.markdown([partial])
    assert "| 2 of 4 (unfinished) |" in figure4.markdown([partial])
    named = figure4.read_run(make_run(runs[0].parent / "resnet20_cifar", "resnet20_cifar", [30.0]))
    assert "| resnet20_cifar | ResNet |" in figure4.markdown([named])  # the folder's name only where it differs


def test_the_machine_lines_give_each_runs_cpu_and_matmul_peaks(runs):
    """scripts/figure4.sh's lines around each run (a real one, first) become the table's yardstick and CPU line."""
    (runs[0] / "train.log").write_text(
        "machine: Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs, fp32 matmul peak 232 GFLOP/s (2 threads, before the "
        "run)\ntraining densenet_bc40_k12 on cifar10 (50000 images, 10 classes) for 4 epochs on cpu -> x\n"
        "machine: Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs, fp32 matmul peak 228 GFLOP/s (2 threads, after the "
        "run)\nmachine: (no matmul peak: the measurement failed)\n")
    bc40 = figure4.read_run(runs[0])
    assert bc40.cpu == "Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs"
    assert bc40.peaks == [(232, "before the run"), (228, "after the run")]
    table = figure4.markdown([bc40])
    assert "| 20.00 | 232 / 228 |" in table
    assert "CPU: Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs (every run)." in table
    (runs[1] / "train.log").write_text("machine: AMD EPYC, 2 CPUs, fp32 matmul peak 300 GFLOP/s (before the run)\n")
    table = figure4.markdown([bc40, figure4.read_run(runs[1]), figure4.read_run(runs[2])])
    assert ("**Not one machine**: bc40: Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs; bc64: AMD EPYC, 2 CPUs; "
            "dn40: not recorded.") in table
    assert "| 18.00 | 300 |" in table and "| 19.50 | – |" in table


@pytest.mark.slow
@needs_pytorchcv
def test_the_curves_pair_the_best_densenet_bc_with_the_resnet_of_closest_error(runs):
    points = [figure4.read_run(r) for r in runs]
    best, resnet = figure4.curve_pair(points)
    assert (best.model, resnet.model) == ("densenet_bc64_k12", "resnet56_cifar")
    assert figure4.curve_pair([p for p in points if p.family != "ResNet"]) is None


@needs_pytorchcv
def test_a_second_recipe_is_flagged(runs):
    points = [figure4.read_run(r) for r in runs]
    assert figure4.protocol_differences(points) == {}
    assert "same recipe" in figure4.markdown(points)
    other = figure4.read_run(make_run(runs[0].parent / "other", "resnet32_cifar", [None, 30.0, None, 22.0], lr=0.1))
    assert figure4.protocol_differences([*points, other]) == {"lr": [0.4] * 6 + [0.1]}
    assert "**Not one protocol**" in figure4.markdown([*points, other])
    bf16 = figure4.read_run(runs[1])
    bf16.config["runtime"] = {"amp": "bf16"}  # --amp auto on another machine
    assert figure4.protocol_differences([figure4.read_run(runs[0]), bf16]) == {"precision (runtime.amp)":
                                                                                [None, "bf16"]}


@pytest.mark.slow
@needs_pytorchcv
def test_the_command_writes_the_figures_and_the_table(runs, tmp_path, capsys):
    out = tmp_path / "figure4"
    code, stdout, _ = run_cli(capsys, "analyze", "figure4", *runs, "--out", out)
    assert code == 0
    for name in ("figure4.png", "curves.png", "figure4.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    table = (out / "figure4.md").read_text()
    assert table.startswith("Made by `densenet analyze figure4 ")
    rows = [line for line in table.splitlines() if line.startswith("| densenet") or line.startswith("| resnet")]
    assert len(rows) == 6 and rows[0].startswith("| densenet_bc40_k12 (bc40) | DenseNet-BC | 0.18M | 72.4M |")
    assert rows[-1].startswith("| resnet56_cifar (r56) | ResNet | 0.86M | 125.7M |")  # ResNets after DenseNets
    assert "| 417 | 8.0 | 4 | 20.00 |" in rows[0]  # img/s, minutes, epochs, test error
    assert "Curves: BC L=64 k=12 (18.00%, 0.37M) beside ResNet-56 (18.50%, 0.86M)" in table
    assert "| densenet_bc40_k12 (bc40) |" in stdout and "wrote" in stdout


def test_a_folder_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "analyze", "figure4", tmp_path / "empty", "--out", tmp_path / "out")
    assert_user_error(code, err, "analyze", "no config.yaml")
    folder = make_run(tmp_path / "unevaluated", "densenet_bc40_k12", [None])
    with pytest.raises(DenseNetError, match="no epoch with a test error"):
        figure4.read_run(folder)
    assert main(["analyze", "figure4", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_no_torch_state_leaks_from_counting():
    figure4.network_cost.cache_clear()
    figure4.network_cost("densenet_bc40_k12", 10, 3, 32)
    assert torch.get_default_device() == torch.device("cpu")


@needs_pytorchcv
def test_the_figure_never_replaces_a_runs_own_curves(runs, capsys):
    before = (runs[0] / "metrics.csv").read_bytes()
    code, _, err = run_cli(capsys, "analyze", "figure4", *runs, "--out", runs[0])
    assert_user_error(code, err, "analyze", "curves.png")
    assert not (runs[0] / "figure4.png").exists() and (runs[0] / "metrics.csv").read_bytes() == before
