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
