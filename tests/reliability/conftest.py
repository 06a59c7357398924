"""Fixtures of the fault and bad-input tests (a trained run, one thread) and the CLI forked, as a real process.

The helpers other tests share too (tiny data on disk, the CLI in-process, user errors) are in tests/helpers.py.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from densenet import cli
from tests.helpers import TINY_MODEL, make_image_folder
from tests.reliability import faults


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only adds OpenMP barrier waits, badly so when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A finished one-epoch run on a tiny CIFAR-style image tree: (data folder, run folder, an image)."""
    from densenet.training.train import train

    root = tmp_path_factory.mktemp("trained")
    data = make_image_folder(root / "data", per_class=2, size=32)
    train(overrides={"model": TINY_MODEL, "dataset": "cifar10", "data_dir": str(data), "epochs": 1,
                     "batch_size": 4, "device": "cpu", "quiet": True, "out": str(root / "run")})
    return data, root / "run", next((data / "test" / "cat").iterdir())


def _import_before_forking() -> None:
    """What a run imports late (every command, plots, TensorBoard), imported once: a forked child starts at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    for module, _ in cli.COMMANDS.values():  # every command's module (the CLI imports only the one it runs)
        importlib.import_module(module)


def run_forked(*argv, fault: str = "none", nth: int = 0, kill_after: float | None = None, log: Path | None = None,
               timeout: float = 300) -> int:
    """``densenet ARGV`` in a forked child (a real process, which a fault can SIGKILL): its exit code.

    Forking reuses this process's imported modules, so a child starts in milliseconds instead of the
    seconds a fresh interpreter needs to import torch. The child uses one thread, as in a DataLoader
    worker (OpenMP's pool does not survive a fork), so every child computes bit for bit alike. Returns
    -9 when the child was killed by SIGKILL (by its fault, or by us ``kill_after`` seconds after the fork).
    Output goes to ``log``.
    """
    _import_before_forking()
    log = log or Path(os.devnull)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            sys.stdout = sys.stderr = open(log, "a", buffering=1)
            torch.set_num_threads(1)
            faults.install(fault, nth)
            code = cli.main([str(a) for a in argv])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    start = time.monotonic()
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if kill_after is not None and time.monotonic() - start >= kill_after:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"densenet {' '.join(map(str, argv))} ran over {timeout} s")
        time.sleep(0.001 if kill_after is not None else 0.01)
