"""Kill ``densenet train`` with SIGKILL at an exact point: a test tool, never imported by the library.

    python -m tests.reliability.faults FAULT N train --out RUN ...      # or install(FAULT, N) in a child

FAULT is one of

- ``step``: SIGKILL before the N-th training step of this process (a kill in the middle of an epoch);
- ``torn``: on the N-th checkpoint write, SIGKILL after half of the bytes reached the temporary file
  (a kill in the middle of torch.save);
- ``before-rename``: on the N-th checkpoint rename, SIGKILL once the temporary file is complete and
  fsynced, just before ``os.replace`` puts it in place;
- ``after-rename``: on the N-th checkpoint rename, SIGKILL right after ``os.replace``;
- ``pause``: sleep N tenths of a second before every training step (not a kill: a run kept going long enough
  for a second process to meet it);
- ``slow-config``: sleep N tenths of a second just before config.yaml is renamed into place (the first file a
  run writes): two runs started together both find the folder empty before either writes it;
- ``none``: no fault.

The faults wrap ``torch.save``, ``os.replace`` and ``F.cross_entropy`` (called once per training step);
the library's own code runs unchanged around them, so what is left on disk is what a real kill at that
moment leaves. Under torchrun a fault fires only in the process whose RANK is ``FAULT_RANK`` (default:
any) and only on the first attempt (TORCHELASTIC_RESTART_COUNT 0), so the restarted job can finish.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

FAULTS = ("none", "step", "torn", "before-rename", "after-rename", "pause", "slow-config")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _is_checkpoint(name) -> bool:
    return os.path.basename(str(name)).endswith(".pt") and "checkpoint" in os.path.basename(str(name))


def install(fault: str, nth: int) -> None:
    """Arm ``fault`` to fire at its ``nth`` occasion in this process."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
    if fault == "none" or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if os.environ.get("FAULT_RANK") not in (None, os.environ.get("RANK", "0")):
        return
    count = [0]

    def fire() -> bool:
        count[0] += 1
        return count[0] == nth

    if fault == "slow-config":
        real_rename = os.replace

        def slow_replace(src, dst, *args, **kwargs):
            if os.path.basename(str(dst)) == "config.yaml":
                time.sleep(nth / 10)
            return real_rename(src, dst, *args, **kwargs)

        os.replace = slow_replace
    elif fault == "pause":
        real_step_loss = F.cross_entropy

        def slow_cross_entropy(*args, **kwargs):
            if kwargs.get("reduction", "mean") == "mean":  # a training step
                time.sleep(nth / 10)
            return real_step_loss(*args, **kwargs)

        F.cross_entropy = slow_cross_entropy
    elif fault == "step":
        real_loss = F.cross_entropy

        def cross_entropy(*args, **kwargs):
            if kwargs.get("reduction", "mean") == "mean" and fire():  # training steps; evaluation sums
                _die()
            return real_loss(*args, **kwargs)

        F.cross_entropy = cross_entropy
    elif fault == "torn":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if not _is_checkpoint(getattr(f, "name", f)) or not fire():
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()

        torch.save = save
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if not _is_checkpoint(dst):
                return real_replace(src, dst, *args, **kwargs)
            now = fire()
            if now and fault == "before-rename":
                _die()
            result = real_replace(src, dst, *args, **kwargs)
            if now:
                _die()
            return result

        os.replace = replace


def main(argv: list[str]) -> int:
    install(argv[0], int(argv[1]))
    from densenet.cli import main as densenet_main

    return densenet_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
