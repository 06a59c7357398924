"""densenet report over run folders written by the training code's own writers, with a tiny trained model."""

import re

import pytest

from densenet.analysis.complexity import count_macs, count_parameters
from densenet.analysis.report import PAPER_ERRORS, paper_label, read_run
from densenet.cli import main
from densenet.training.options import TrainOptions
from densenet.training.run_folder import write_config, write_metrics
from tests.deploy.trained import train_tiny


def make_run(folder, model, options: dict, errors: list[float], val_errors: list[float] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, TrainOptions(**options).to_dict())
    history = []
    for epoch, error in enumerate(errors, start=1):
        row = {"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_error": 1.0, "seconds": 1.0}
        if error is not None:  # None: an epoch that --eval-every did not evaluate
            row |= {"test_error": error, "test_top5_error": 0.5}
        if val_errors:
            row["val_error"] = val_errors[epoch - 1]
        history.append(row)
    write_metrics(folder, history)
    if model is not None:
        from densenet.models.weights import save_weights

        save_weights(model, folder / "model.safetensors", {"model": options["model"], "dataset": options["dataset"],
                                                            "input_size": 8})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model, _ = train_tiny(root / "trained")
    # A run with the paper's error in its recipe, one looked up in the table, one with a validation column.
    make_run(root / "recipe", model, dict(dataset="digits", model="densenet_bc16_k4", epochs=4,
                                          info={"paper_error": 1.5}), [30.0, 10.0, 4.0])
    make_run(root / "table", model, dict(dataset="cifar10", model="densenet40_k12", epochs=3, augment="standard",
                                         train_subset=1000),
             [50.0, 20.0, 9.25])
    make_run(root / "svhn", model, dict(dataset="svhn", model="densenet_bc16_k4", epochs=3),
             [5.0, 3.0, 3.5], val_errors=[6.0, 2.0, 2.5])
    return root, model


@pytest.mark.slow
def test_rows_take_error_size_and_paper_numbers_from_the_run(runs):
    root, model = runs
    recipe = read_run(root / "recipe")
    assert (recipe.model, recipe.epochs_done, recipe.epochs_planned) == ("densenet_bc16_k4", 3, 4)
    assert recipe.error == 4.0 and recipe.paper_error == 1.5 and recipe.difference == pytest.approx(2.5)
    assert recipe.params == count_parameters(model) and recipe.macs == count_macs(model, 8)
    table = read_run(root / "table")
    assert table.paper_error == 5.24 and table.difference == pytest.approx(4.01)  # Table 2, C10+
    make_run(root / "sparse", model, dict(dataset="cifar10", model="densenet_bc16_k4", epochs=5, eval_every=2),
             [None, 20.0, None, 11.0, 9.0])
    sparse = read_run(root / "sparse")
    assert (sparse.epochs_done, sparse.epochs_planned, sparse.error) == (5, 5, 9.0) and "epoch 5" in sparse.error_rule
    svhn = read_run(root / "svhn")
    assert svhn.error == 3.0 and "lowest validation" in svhn.error_rule  # the paper's SVHN protocol


@pytest.mark.slow
def test_report_command_prints_markdown_and_writes_the_plots(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "report"
    assert main(["report", str(root / "recipe"), str(root / "table"), str(root / "svhn"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 3
    assert re.search(r"\| table \| densenet40_k12 \| C10\+ \| 3 on 1,000 images \| .* \| 9\.25 \| 5\.24 \| \+4\.01 \|",
                     printed)
    assert "| recipe | densenet_bc16_k4 | digits | 3 of 4 |" in printed
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    written = (out / "report.md").read_text()
    assert "9.25" in written and "report.png" in written and "densenet report" in written


def test_the_paper_table_matches_the_paper():
    assert PAPER_ERRORS[("densenet40_k12", "cifar10", "standard")] == 5.24
    assert PAPER_ERRORS[("densenet40_k12", "cifar10", "none")] == 7.00
    assert PAPER_ERRORS[("densenet_bc100_k12", "cifar100", "standard")] == 22.27
    assert PAPER_ERRORS[("densenet_bc250_k24", "svhn", "none")] == 1.74
    assert PAPER_ERRORS[("densenet121", "imagenet", "standard")] == 25.02
    assert ("densenet_bc190_k40", "cifar10", "none") not in PAPER_ERRORS  # "–" in the paper
    assert paper_label("cifar100", "none") == "C100" and paper_label("cifar10", "standard") == "C10+"


def test_a_folder_that_is_not_a_run_is_one_line(runs, tmp_path, capsys):
    root, _ = runs
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("dataset: digits\n")
    assert main(["report", str(root / "recipe"), str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no metrics.csv" in err
