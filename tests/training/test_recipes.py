"""Every recipe in configs/ loads, validates, and builds its model (on the meta device: shapes only)."""

from pathlib import Path

import pytest
import torch

from densenet.models import create_model
from densenet.training.options import resolve_options

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10, "imagenet": 1000}


def test_there_is_a_recipe_per_row_of_tables_2_and_3():
    names = {p.stem for p in CONFIGS}
    assert len([n for n in names if n.split("-")[0] in ("c10", "c10plus", "c100", "c100plus", "svhn")]) == 27
    assert {f"imagenet-densenet{d}" for d in (121, 169, 201, 264, 161)} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_builds_its_model(path):
    options = resolve_options(path)
    with torch.device("meta"):
        model = create_model(options.model, num_classes=CLASSES.get(options.dataset, 2),  # medmnist, csv: from the file
                             in_chans=1 if options.dataset == "digits" else 3, drop_rate=options.drop_rate)
    assert sum(p.numel() for p in model.parameters()) > 0
    if path.stem.split("-")[0] in ("c10", "c10plus", "c100", "c100plus", "svhn", "imagenet"):  # the paper's, as written
        assert options.lr == 0.1 and options.momentum == 0.9 and options.nesterov and options.weight_decay == 1e-4
        assert (options.schedule, options.weight_decay_on, options.label_smoothing, options.tta, options.amp,
                options.crop_padding, options.eval_every, options.small_crop_epochs, options.flip) == (
                    "step", "all", 0.0, "none", "none", 4, 1, 0, "random")
        assert options.info["paper_error"] > 0
        assert options.batch_size == (256 if options.dataset == "imagenet" else 64)
        assert options.epochs == {"imagenet": 90, "svhn": 40}.get(options.dataset, 300)
        assert options.drop_rate == (0.2 if options.augment == "none" else 0.0)
