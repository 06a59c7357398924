import pytest

from densenet.errors import ConfigError
from densenet.training.options import TrainOptions, read_recipe, resolve_options
from densenet.training.schedule import build_optimizer, build_scheduler, lr_at


def test_paper_defaults_by_dataset():
    c10 = TrainOptions(dataset="cifar10")
    assert (c10.epochs, c10.batch_size, c10.milestones, c10.augment, c10.drop_rate) == (300, 64, [150, 225],
                                                                                        "standard", 0.0)
    c10_plain = TrainOptions(dataset="cifar10", augment="none")
    assert c10_plain.drop_rate == 0.2  # the paper: dropout where there is no augmentation
    svhn = TrainOptions(dataset="svhn")
    assert (svhn.epochs, svhn.milestones, svhn.augment, svhn.drop_rate) == (40, [20, 30], "none", 0.2)
    imagenet = TrainOptions(dataset="imagenet")
    assert (imagenet.epochs, imagenet.batch_size, imagenet.milestones, imagenet.model) == (90, 256, [30, 60],
                                                                                           "densenet121")
    default = TrainOptions()
    assert (default.model, default.dataset, default.epochs, default.milestones, default.threads) == (
        "densenet_bc40_k12", "digits", 20, [10, 15], 1)


@pytest.mark.parametrize("field, value, words", [
    ("lr", 0, "--lr must be a positive number"), ("lr", -0.1, "--lr"), ("batch_size", 0, "--batch-size"),
    ("epochs", 0, "--epochs"), ("drop_rate", 1.0, "--drop-rate"), ("augment", "heavy", "--augment"),
    ("amp", "fp8", "--amp"), ("milestones", [5, 2], "milestones"), ("dataset", "mnist", "unknown data set"),
    ("workers", -1, "--workers"), ("epochs", 2.5, "--epochs"),
])
def test_out_of_range_options_are_config_errors(field, value, words):
    with pytest.raises(ConfigError, match=words):
        TrainOptions(**{field: value})


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: cifar10\nmodel: densenet40_k12\nepochs: 40\npaper_error: 5.24\n")
    options = resolve_options(recipe, {"epochs": 4, "lr": None})
    assert options.model == "densenet40_k12" and options.epochs == 4 and options.milestones == [2, 3]
    assert options.info == {"paper_error": 5.24}
    recipe.write_text("dataset: cifar10\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        read_recipe(recipe)
    recipe.write_text("dataset: [cifar10\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe(tmp_path / "missing.yaml")


def test_schedule_is_the_papers():
    import torch

    options = TrainOptions(dataset="cifar10", epochs=8)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, options)
    group = optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["dampening"] == 0
    assert group["weight_decay"] == 1e-4
    scheduler = build_scheduler(optimizer, options)
    seen = []
    for epoch in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(lr_at(epoch, options))
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


# The flags densenet train had before they were generated from TrainOptions' fields (new options add more).
TRAIN_FLAGS = ("--config --model --dataset --data-dir --download --epochs --batch-size --lr --schedule --warmup "
               "--milestones --weight-decay --weight-decay-on --label-smoothing --pos-weight --tta --drop-rate "
               "--augment --input-size --train-subset --seed --device --workers --threads --amp --compile "
               "--channels-last --no-channels-last --eager --memory-efficient --init --out --resume --quiet "
               "--crop-padding --eval-every --small-crop --small-crop-epochs --flip --fork").split()


def _train_parser():
    import argparse

    from densenet.commands.train import add_arguments

    parser = argparse.ArgumentParser(prog="densenet train")
    add_arguments(parser)
    return parser


def test_train_flags_are_the_options_fields():
    from densenet.training.options import FLAGS

    parser = _train_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    assert set(TRAIN_FLAGS) <= flags  # none lost
    own = {"--config", "--eager", "--resume", "--fork", "--no-channels-last"}  # the command's, and --x's --no-x
    assert flags - own == {f"--{name.replace('_', '-')}" for name in FLAGS}  # the rest: one per option field
    args = parser.parse_args([])
    assert all(value is None for value in vars(args).values())  # only flags given override a recipe
    args = parser.parse_args(["--batch-size", "8", "--lr", "0.05", "--milestones", "3", "5", "--no-channels-last",
                              "--schedule", "onecycle", "--quiet", "--amp", "bf16"])
    assert (args.batch_size, args.lr, args.milestones, args.channels_last, args.schedule, args.quiet, args.amp) == (
        8, 0.05, [3, 5], False, "onecycle", True, "bf16")


def test_a_flags_choices_are_the_fields_literal(capsys):
    with pytest.raises(SystemExit):
        _train_parser().parse_args(["--weight-decay-on", "biases"])
    assert "choose from 'all', 'weights'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--weight-decay-on must be one of all, weights"):
        TrainOptions(weight_decay_on="biases")
