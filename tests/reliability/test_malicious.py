"""A weights file or checkpoint from a stranger never runs code: every command that reads one refuses it.

The malicious file is a genuine torch.save checkpoint whose unpickling runs ``touch MARKER``
(tests/training/test_checkpoint.py shows that a plain torch.load really runs it). Each command must stop
with one clear line, exit non-zero, leave the marker absent and write nothing.
"""

import shutil

import pytest

from densenet.training.checkpoint import BEST, LAST
from tests.helpers import TINY_MODEL, assert_user_error, run_cli, write_malicious


@pytest.fixture
def evil(tmp_path):
    """(a malicious .pth file, the marker file its unpickling would create)."""
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pth", marker)
    return tmp_path / "evil.pth", marker


def _evil_run(trained_run, tmp_path, marker):
    """A copy of a real run folder whose checkpoints were swapped for malicious ones and weights removed."""
    run = tmp_path / "evil-run"
    shutil.copytree(trained_run, run)
    (run / "model.safetensors").unlink()
    for name in (LAST, BEST):
        write_malicious(run / name, marker)
    return run


def _refused(capsys, command, argv, marker, names):
    code, _, err = run_cli(capsys, command, *argv)
    line = assert_user_error(code, err, command, "refusing to load", *names)
    assert "could run code" in line
    assert not marker.exists(), "the malicious pickle ran"
    return line


def test_train_init_refuses_it(capsys, trained, evil, tmp_path):
    data, _, _ = trained
    path, marker = evil
    out = tmp_path / "new-run"
    _refused(capsys, "train", ["--init", path, "--model", TINY_MODEL, "--dataset", "cifar10", "--data-dir", data,
                               "--epochs", 1, "--device", "cpu", "--quiet", "--out", out], marker, [path.name])
    assert not out.exists()


def test_train_resume_refuses_it(capsys, trained, tmp_path):
    marker = tmp_path / "pwned"
    run = _evil_run(trained[1], tmp_path, marker)
    before = sorted(p.name for p in run.iterdir())
    _refused(capsys, "train", ["--resume", run], marker, [LAST])
    assert sorted(p.name for p in run.iterdir()) == before


def test_evaluate_refuses_it(capsys, trained, evil, tmp_path):
    data, _, _ = trained
    path, marker = evil
    _refused(capsys, "evaluate", ["--checkpoint", path, "--dataset", "cifar10", "--data-dir", data], marker,
             [path.name])
    run = _evil_run(trained[1], tmp_path, marker)
    _refused(capsys, "evaluate", ["--checkpoint", run, "--dataset", "cifar10", "--data-dir", data], marker, [LAST])


def test_predict_refuses_it(capsys, trained, evil):
    path, marker = evil
    _refused(capsys, "predict", [path, trained[2]], marker, [path.name])


def test_export_refuses_it(capsys, evil, tmp_path):
    path, marker = evil
    _refused(capsys, "export", [path, "--out", tmp_path / "model.onnx"], marker, [path.name])
    assert not (tmp_path / "model.onnx").exists()


def test_analyze_refuses_it(capsys, evil, tmp_path):
    path, marker = evil
    _refused(capsys, "analyze", ["reuse", path, "--out", tmp_path / "reuse"], marker, [path.name])
    assert not (tmp_path / "reuse" / "reuse.png").exists()


def test_report_refuses_it(capsys, trained, tmp_path):
    marker = tmp_path / "pwned"
    run = _evil_run(trained[1], tmp_path, marker)
    _refused(capsys, "report", [run, "--out", tmp_path / "report"], marker, [LAST])
    assert not (tmp_path / "report" / "report.md").exists()


def test_the_real_run_folder_is_accepted_by_the_same_commands(capsys, trained, tmp_path):
    """The refusals above are about the file, not the commands: the genuine run folder works.

    (report is left out: its figure sizes every model of the paper, seconds of work that prove nothing here.)
    """
    data, run, image = trained
    assert run_cli(capsys, "predict", run, image)[0] == 0
    assert run_cli(capsys, "evaluate", "--checkpoint", run, "--dataset", "cifar10", "--data-dir", data)[0] == 0
