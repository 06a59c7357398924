"""What a new (and careless) user met, one case each (issue 28): outputs over inputs, recipe values of the wrong type,
impossible data and options, a resume given other options, weights without metadata, unreadable images and file
names, and files that are not weights. Each case is listed in docs/reliability.md with what it prints now.

The two-process cases (two trainings in one folder, two resumes, SIGKILL then resume) are in test_one_writer.py.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from densenet.models import create_model
from densenet.models.weights import save_weights
from densenet.training.checkpoint import BEST, LAST, load_checkpoint
from tests.helpers import TINY_MODEL, assert_user_error, make_image_folder, run_cli

# digits, a tiny model, 64 training images: about a second an epoch
TINY = ["--model", "densenet_bc10_k4", "--train-subset", "64", "--batch-size", "32", "--device", "cpu", "--quiet",
        "--threads", "1"]


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the finished tiny run (cifar10-style folder data, 2 classes, 3 channels) and one of its images."""
    data, source, image = trained
    shutil.copytree(source, tmp_path / "run")
    return tmp_path / "run", image


# -- 1. outputs: never over an input, never over a run's files -----------------------------------------------------

def test_export_over_the_weights_it_reads_is_refused_and_the_run_still_predicts(capsys, run, tmp_path):
    folder, image = run
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    for out in (weights, folder / "config.yaml", folder / LAST):
        code, _, err = run_cli(capsys, "export", folder, "--format", "onnx", "--out", out)
        assert_user_error(code, err, "export", f"--out {out}")
    elsewhere = tmp_path / "elsewhere.onnx"  # a symlink that leads to the weights: the same file
    elsewhere.symlink_to(weights)
    code, _, err = run_cli(capsys, "export", weights, "--format", "onnx", "--out", elsewhere)
    assert_user_error(code, err, "export", "is a file densenet export reads", "would destroy it")
    assert weights.read_bytes() == before
    code, out, err = run_cli(capsys, "predict", folder, image, "--engine", "eager")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", folder, "--out", folder / "model.onnx")  # a new file there is fine
    assert code == 0, err


def test_report_and_bench_refuse_outputs_that_are_inputs_or_run_files(capsys, run, tmp_path):
    folder, _ = run
    metrics = (folder / "metrics.csv").read_bytes()
    (folder / "report.md").symlink_to(folder / "metrics.csv")  # report.md would be written through it
    code, _, err = run_cli(capsys, "report", folder, "--out", folder)
    assert_user_error(code, err, "report", "report.md", "is a file densenet report reads")
    code, _, err = run_cli(capsys, "bench", "memory", "--models", TINY_MODEL, "--results", folder / "metrics.csv",
                           "--markdown", tmp_path / "m.md", "--plot", tmp_path / "m.png", "--repeats", 0)
    assert_user_error(code, err, "bench", "--results", "metrics.csv, a file of the training run")
    code, _, err = run_cli(capsys, "bench", "memory", "--models", TINY_MODEL, "--results", tmp_path / "m.json",
                           "--markdown", tmp_path / "m.json", "--plot", tmp_path / "m.png", "--repeats", 0)
    assert_user_error(code, err, "bench", "--markdown", "the same file as --results")
    assert (folder / "metrics.csv").read_bytes() == metrics and not (tmp_path / "m.json").exists()


# -- 3. recipe values are checked as flags are -------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [
    ('memory_efficient: "no"\n', "memory_efficient must be true or false, not 'no'"),
    ('epochs: "three"\n', "epochs must be an integer, not 'three'"),
    ("model: 42\n", "model must be a name or path (text), not 42"),
    ("lr: .nan\n", "lr must be a finite number, not nan"),
    ("- epochs\n- 3\n", "must be a mapping of option: value, not a list"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a YAML text file"),
], ids=["bool-as-string", "int-as-word", "model-as-number", "nan", "list", "binary"])
def test_recipe_values_of_the_wrong_type_are_one_line_naming_option_and_file(capsys, tmp_path, content, words):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", recipe, *TINY, "--epochs", 1, "--out", out)
    assert_user_error(code, err, "train", words, str(recipe))
    assert not out.exists()


# -- 4. refuse what cannot be meant ------------------------------------------------------------------------------

def test_a_data_set_of_one_class_is_refused(capsys, tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("cat",), per_class=2, size=32)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", "cifar10", "--data-dir", data, *TINY, "--epochs", 1,
                           "--out", out)
    assert_user_error(code, err, "train", "has 1 class (cat)", "at least two")
    assert not out.exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf"])  # --lr=-inf: argparse takes "-inf" for a flag
def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused(capsys, tmp_path, lr):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", 1, f"--lr={lr}", "--out", out)
    assert_user_error(code, err, "train", f"--lr must be a positive number, not {float(lr)}")
    assert not out.exists()


def test_a_model_of_other_input_channels_is_refused_naming_both(capsys, trained, tmp_path):
    data, _, _ = trained
    gray = tmp_path / "gray.safetensors"  # 2 classes like the data, but 1-channel
    save_weights(create_model(TINY_MODEL, num_classes=2, in_chans=1), gray, {"model": TINY_MODEL,
                                                                             "dataset": "cifar10"})
    code, _, err = run_cli(capsys, "evaluate", gray, "--data-dir", data, "--device", "cpu", "--engine", "eager")
    assert_user_error(code, err, "evaluate", "takes 1-channel images but cifar10 has 3-channel images")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", "cifar10", "--data-dir", data, *TINY, "--model",
                           TINY_MODEL, "--epochs", 1, "--init", gray, "--out", out)
    assert_user_error(code, err, "train", "takes 1-channel images, but cifar10 has 3-channel images")
    assert not out.exists()


def test_a_data_dir_that_is_a_file_says_so(capsys, tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really")
    code, _, err = run_cli(capsys, "train", "--dataset", "cifar10", "--data-dir", archive, *TINY, "--epochs", 1,
                           "--out", tmp_path / "run")
    assert_user_error(code, err, "train", f"--data-dir {archive} is a file, not a folder")
    # evaluate reads the data set without TrainOptions: load_data says the same
    run_cli(capsys, "train", *TINY, "--epochs", 1, "--out", tmp_path / "digits")
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "digits", "--dataset", "cifar10", "--data-dir", archive)
    assert_user_error(code, err, "evaluate", f"--data-dir {archive} is a file, not a folder")


# -- 5. resume: what it keeps, what it ignores, what it refuses; fork; fallback --------------------------------------

@pytest.mark.slow  # trains several epochs (seconds)
def test_resume_keeps_its_options_ignores_an_edited_config_refuses_a_change_and_forks(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", 1, "--out", run)
    assert code == 0, err
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.1\n", "lr: 0.5\n"))
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", 2, "--lr", 0.5)
    assert_user_error(code, err, "train", "--lr 0.5 (the run's: 0.1) would change it", "--fork NEW_DIR")
    assert load_checkpoint(run / LAST)["epoch"] == 1
    code, out, err = run_cli(capsys, "train", "--resume", run, "--epochs", 2, "--seed", 0)
    assert code == 0, err
    assert (f"resuming {run} after epoch 1 with the options saved in its checkpoint; changed: --epochs 2; given "
            f"again, unchanged: --seed") in out
    assert f"{config} differs from the run's checkpoint (lr: 0.5): ignored" in out
    assert load_checkpoint(run / LAST)["config"]["lr"] == 0.1
    fork = tmp_path / "fork"
    code, out, err = run_cli(capsys, "train", "--resume", run, "--epochs", 3, "--lr", 0.5, "--fork", fork)
    assert code == 0, err
    assert f"forked {run} (epoch 2) into {fork}" in out
    forked, original = load_checkpoint(fork / LAST), load_checkpoint(run / LAST)
    assert forked["epoch"] == 3 and forked["config"]["lr"] == 0.5 and forked["history"][-1]["lr"] == 0.5
    assert forked["history"][:2] == original["history"] and original["epoch"] == 2  # the original is as it was
    assert all(group["lr"] == 0.5 for group in forked["optimizer"]["param_groups"])


@pytest.mark.slow  # trains several epochs (seconds)
def test_a_corrupt_last_checkpoint_falls_back_to_the_best_one_and_says_so(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", 2, "--out", run)[0] == 0
    best = load_checkpoint(run / BEST)["epoch"]
    data = (run / LAST).read_bytes()
    (run / LAST).write_bytes(data[: len(data) // 2])
    code, out, err = run_cli(capsys, "train", "--resume", run, "--epochs", 3)
    assert code == 0, err
    assert (f"{run / LAST} is not a readable checkpoint (truncated or corrupt?): resuming from {run / BEST} "
            f"(epoch {best}) instead") in out


# -- 6. weights without metadata ---------------------------------------------------------------------------------

def test_weights_without_metadata_say_what_predict_and_evaluate_assume_and_take_it_from_a_run(capsys, tmp_path):
    from tests.deploy.trained import digit_images, train_tiny

    folder = tmp_path / "run"
    model, metadata = train_tiny(folder)  # digits: 1 channel, 10 classes, mean/std of the digits
    plain = tmp_path / "plain.safetensors"  # the same weights as a bare state dict
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    image = tmp_path / "digit.png"
    Image.fromarray(digit_images(1)[0][0, 0].numpy()).save(image)
    common = [image, "--json", "--engine", "eager", "--device", "cpu"]

    code, bare, err = run_cli(capsys, "predict", plain, *common)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1, err
    assert all(words in notes[0] for words in ("carries no classes, mean, std, input_size", "no normalisation",
                                               "class indices as names", "--metadata-from RUN_DIR", "--mean"))
    _, with_metadata, _ = run_cli(capsys, "predict", folder, *common)
    assert json.loads(bare) != json.loads(with_metadata)  # other preprocessing: why the note is needed
    code, attached, err = run_cli(capsys, "predict", plain, *common, "--metadata-from", folder)
    assert code == 0 and "note:" not in err, err
    assert json.loads(attached) == json.loads(with_metadata)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(metadata["classes"]) + "\n")
    code, given, err = run_cli(capsys, "predict", plain, *common, "--classes", names, "--mean", *metadata["mean"],
                               "--std", *metadata["std"], "--input-size", 8)
    assert code == 0 and "note:" not in err and json.loads(given) == json.loads(with_metadata)

    code, out, err = run_cli(capsys, "evaluate", plain, "--dataset", "digits", "--engine", "eager", "--device", "cpu")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "carries no preprocessing" in notes[0] and "--metadata-from RUN_DIR" in notes[0]


# -- 7. predict and check-data: every readable image, names in any encoding, no library warnings -------------------

def test_file_names_that_are_not_utf8_are_printed_escaped(capsys, run, tmp_path):
    folder, image = run
    images = tmp_path / "images"
    images.mkdir()
    good = os.path.join(os.fsencode(images), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    shutil.copyfile(image, good)
    with open(os.path.join(os.fsencode(images), b"bad\xff.png"), "wb"):
        pass  # an empty file: unreadable
    code, out, err = run_cli(capsys, "predict", folder, images, "--engine", "eager")
    assert code == 1  # the good image's results are printed, the unreadable one listed
    assert f"{images}/caf\\xe9.png" in out.splitlines()
    assert_user_error(code, err, "predict", f"cannot read image {images}/bad\\xff.png: empty file")
    code, out, err = run_cli(capsys, "check-data", images, "--workers", 1, "--quiet")
    assert code == 1 and out.startswith(f"cannot read image {images}/bad\\xff.png: empty file")
    assert "checked 2 image files" in err and "1 broken" in err


def test_pillow_warnings_do_not_reach_the_user(capsys, run, monkeypatch):
    folder, image = run
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 32x32 = 1024 pixels: Pillow warns of a "bomb" (< 2x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(capsys, "predict", folder, image, "--engine", "eager")
    assert code == 0, err
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBomb" not in err and "attack" not in err


def test_files_that_are_not_weights_are_told_apart_from_pickles_that_could_run_code(capsys, run, tmp_path):
    folder, image = run
    scripted = tmp_path / "model.pt"
    assert run_cli(capsys, "export", folder, "--format", "torchscript", "--out", scripted)[0] == 0
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    protocol4 = tmp_path / "protocol4.pt"  # a real state dict, in a pickle protocol weights-only loading lacks
    torch.save({"w": torch.zeros(2)}, protocol4, _use_new_zipfile_serialization=False, pickle_protocol=4)
    cases = [(scripted, "is a TorchScript archive"), (text, "is not a weights file we can read: a text file"),
             (protocol4, "a pickle that weights-only loading cannot read")]
    for path, words in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run_cli(capsys, "predict", path, image)
        line = assert_user_error(code, err, "predict", str(path), words)
        assert "could run code" not in line and "weights_only" not in line
        assert not [w for w in caught if "torch" in w.filename], [str(w.message) for w in caught]


def test_explain_refuses_to_write_over_an_image_it_reads(capsys, run, tmp_path):
    folder, image = run
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(image, images / "a.png")
    shutil.copyfile(image, images / "a.cam.png")  # what an earlier `explain ... --out images` wrote for a.png
    code, _, err = run_cli(capsys, "explain", folder, images, "--out", images, "--device", "cpu")
    assert_user_error(code, err, "explain", f"--out {images / 'a.cam.png'} is a file densenet explain reads")
    code, _, err = run_cli(capsys, "explain", folder, images / "a.png", "--out", folder, "--device", "cpu")
    assert code == 0, err  # a new file in the run folder is fine
    assert (folder / "a.cam.png").is_file()
