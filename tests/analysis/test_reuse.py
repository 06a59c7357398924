"""The Figure-5 heat map: an exact matrix from weights set by hand, and `densenet analyze reuse` on a trained model."""

import csv

import numpy as np
import pytest
import torch

from densenet.analysis.reuse import feature_reuse, reading_weight
from densenet.cli import main
from densenet.models.densenet import DenseNet
from tests.deploy.trained import train_tiny


def value(block: int, source: int, target: int) -> float:
    """The mean |w| we plant on the connection source -> target of a block: distinct for every pixel."""
    return block + 0.1 * (source + 1) + 0.01 * target


def plant(model: DenseNet) -> None:
    """Give every weight connecting s to l the magnitudes value(b, s, l) * (1 +- 0.5), with mixed signs.

    The mean absolute weight of each slice is then exactly value(b, s, l); any other normalisation
    (the plain L1 sum, or dividing by the maps only) or a slice shifted by one layer gives another number.
    """
    names = dict(model.features.named_children())
    blocks = model.dense_blocks()
    for b, block in enumerate(blocks, start=1):
        c0, k = block.in_channels, block.growth_rate
        starts = [0] + [c0 + k * i for i in range(len(block) + 1)]  # s = 0: c0 maps, then k per layer
        targets = [layer.conv1 if layer.bottleneck else layer.conv2 for layer in block.values()]
        targets.append(names[f"transition{b}"].conv if b < len(blocks) else model.classifier)
        for column, module in enumerate(targets):
            weight = reading_weight(module)
            for s in range(column + 1):
                part = weight[:, starts[s]:starts[s + 1]]
                pattern = torch.tensor([1.5, -0.5, -1.5, 0.5]).repeat(part.numel() // 4 + 1)[: part.numel()]
                if part.numel() % 2:  # keep the mean of |pattern| exactly 1 for an odd count too
                    pattern[-1] = 1.0
                weight[:, starts[s]:starts[s + 1]] = value(b, s, column + 1) * pattern.view_as(part)
            with torch.no_grad():
                module.weight.copy_(weight.view_as(module.weight))


@pytest.mark.parametrize("bottleneck_width", [None, 2])
def test_the_matrix_is_the_mean_absolute_weight_of_each_connection(bottleneck_width):
    # c0 = 3 block-input maps and k = 2 per layer, so a slice off by one layer reads other numbers.
    model = DenseNet(growth_rate=2, block_config=[3, 2], num_init_features=3, bottleneck_width=bottleneck_width,
                     compression=0.5, stem="cifar", in_chans=1, num_classes=4)
    plant(model)
    blocks = feature_reuse(model)
    assert [r.num_layers for r in blocks] == [3, 2]
    assert blocks[0].targets[-1] == "features.transition1.conv" and blocks[1].targets[-1] == "classifier"
    conv = "conv1" if bottleneck_width else "conv2"
    assert blocks[0].targets[0] == f"features.denseblock1.denselayer1.{conv}"
    assert blocks[0].source_maps == [3, 2, 2, 2]
    assert blocks[1].source_maps == [int(0.5 * (3 + 3 * 2)), 2, 2]
    for r in blocks:
        size = r.num_layers + 1
        expected = np.full((size, size), np.nan)
        for column in range(size):
            for s in range(column + 1):
                expected[s, column] = value(r.block, s, column + 1)
        np.testing.assert_allclose(r.mean_abs, expected, rtol=1e-6)
        # The CSV's L1 sum is the same number times the weights of the slice.
        assert r.sum_abs[0, 0] == pytest.approx(expected[0, 0] * reading_weight(
            model.get_submodule(r.targets[0])).shape[0] * r.source_maps[0] * (1 if bottleneck_width else 9), rel=1e-6)


def test_analyze_reuse_on_a_trained_model_writes_png_and_csv(tmp_path, capsys):
    model, _ = train_tiny(tmp_path / "run")
    out = tmp_path / "figure5"
    assert main(["analyze", "reuse", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "block 3: 2 layers" in capsys.readouterr().out
    assert (out / "reuse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "reuse.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (3 * 4 // 2)  # three blocks of 2 layers: 3 targets, 1 + 2 + 3 connections
    first = feature_reuse(model)[0]
    row = next(r for r in rows if (r["block"], r["source"], r["target"]) == ("1", "0", "3"))
    assert row["target_module"] == "features.transition1.conv"
    assert float(row["mean_abs_weight"]) == pytest.approx(first.mean_abs[0, 2], rel=1e-6)
    assert float(row["mean_abs_weight"]) == pytest.approx(
        float(model.features.transition1.conv.weight.detach()[:, :8].abs().mean()), rel=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["reuse.csv", "reuse.png"]


def test_analyze_needs_an_analysis_and_readable_weights(tmp_path, capsys):
    assert main(["analyze", "reuse", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["analyze"]) == 2
    assert "densenet analyze reuse" in capsys.readouterr().err
