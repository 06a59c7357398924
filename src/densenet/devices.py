"""Where a model runs and in what precision: one answer for train, evaluate, predict and bench.

    device = resolve_device("auto")            # cuda when there is one, else cpu
    with autocast(device, "bf16"):
        logits = model(images)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from densenet.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda", "auto")  # the choices of the --device flags (predict and bench also take cuda:N, mps)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """cpu, cuda, cuda:N, mps or auto (cuda when there is one, else cpu) -> a device that exists here.

    A device that is not here is a ConfigError saying what to use instead.
    """
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def autocast(device: torch.device, amp: str):
    """Mixed precision for the code inside: ``bf16`` or ``fp16`` autocast on ``device``; ``none``/``fp32``: none."""
    if amp in ("none", "fp32"):
        return contextlib.nullcontext()
    import torch

    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"precision {amp!r} is not one of none, fp32, bf16, fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def cpu_info() -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo ("model name", "flags", ...); {} elsewhere. The one
    place the file is read: native bf16 is decided from its flags, and every benchmark names the CPU from it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name and core count, as benchmarks print it beside their figures."""
    import os
    import platform

    name = cpu_info().get("model name") or platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (not emulated through fp32, which is slower than fp32).

    A CPU does with AVX-512 BF16 or AMX (Linux's /proc/cpuinfo flags; elsewhere: no, rather than a guess).
    """
    import torch

    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info().get("flags", "").split()))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU has nothing to wait for): before and
    after anything timed."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` (size x size) @ (size x size) products at this precision: the yardstick
    every benchmark prints beside its figures (far below the machine's usual, something else was running)."""
    import time

    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
