"""Helpers for the fault and bad-input tests: tiny data on disk, the CLI in-process or forked, user errors."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import cli
from tests.reliability import faults

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = "densenet_bc16_k4"


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 8, seed: int = 0) -> Path:
    """root/{train,test}/<class>/<n>.png: small random images, each class a different mean colour."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 128, (size, size, 3)) + 100 * c
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


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


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``densenet ARGV`` in this process: (exit code, stdout, stderr). An uncaught exception fails the test."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, command: str, *needles: str) -> str:
    """Non-zero exit, exactly one ``densenet COMMAND: error: ...`` line on stderr naming each needle, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"densenet {command}: error: ")]
    assert code != 0, f"exit code 0 for a user error; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert len(errors) == 1, f"expected one error line on stderr, got: {err!r}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """One thread, so a run is bitwise repeatable and does not fight the other tests for the two cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


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
