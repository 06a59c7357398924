"""Checkpoints: atomic writes, weights-only reads, and the choice of the one to resume from."""


import pytest
import torch

from densenet.errors import DenseNetError
from densenet.training.checkpoint import BEST, LAST, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.helpers import write_malicious


def test_the_malicious_file_really_runs_code_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what we must never do
    assert marker.exists()


def test_round_trip_and_no_temporary_left(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 2, "config": {"lr": 0.1}, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / LAST, state)
    loaded = load_checkpoint(tmp_path / LAST)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    save_checkpoint(tmp_path / LAST, {"epoch": 1})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / LAST, {"epoch": 2, "bad": Unsaveable()})
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / LAST, marker)
    with pytest.raises(DenseNetError, match="refusing to load"):
        load_checkpoint(tmp_path / LAST)
    assert latest_checkpoint(tmp_path) is None
    assert not marker.exists()


def test_torn_checkpoint_is_a_clear_error_and_resume_falls_back(tmp_path):
    save_checkpoint(tmp_path / BEST, {"epoch": 3})
    save_checkpoint(tmp_path / LAST, {"epoch": 5})
    assert latest_checkpoint(tmp_path) == tmp_path / LAST
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(DenseNetError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / LAST)
    assert latest_checkpoint(tmp_path) == tmp_path / BEST


def test_missing_and_unwritable(tmp_path):
    with pytest.raises(DenseNetError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(DenseNetError, match="could not write checkpoint"):
        save_checkpoint(tmp_path / "no-such-dir" / LAST, {"epoch": 1})
