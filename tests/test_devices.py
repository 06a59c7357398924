"""The one device resolution and autocast that train, evaluate, predict and bench share."""

import pytest
import torch

from densenet.devices import autocast, resolve_device
from densenet.errors import ConfigError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_what_to_use():
    with pytest.raises(ConfigError, match="CUDA is not available here; use --device cpu or auto"):
        resolve_device("cuda")


def test_autocast():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "none"):
        assert (a @ a).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ConfigError):
        autocast(torch.device("cpu"), "int8")


def test_cpu_info_is_read_in_one_place():
    """devices.cpu_info is the only reader of /proc/cpuinfo (bench, engines and bf16 detection ask it)."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "densenet"
    readers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if '"/proc/cpuinfo"' in p.read_text())
    assert readers == ["devices.py"]
    from densenet.devices import cpu_info, cpu_model

    if Path("/proc/cpuinfo").exists():
        assert cpu_info().get("model name") and cpu_info()["model name"] in cpu_model()
