"""torchvision's published ImageNet weights, by model name, through torchvision's own weights API.

    model = densenet.create_model("densenet121", pretrained=True)
    densenet predict densenet121 photo.jpg

The file comes from ``torchvision.models.get_model_weights(name).DEFAULT``: its URL, torch.hub's cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``) and the SHA-256 prefix in
its file name. torch.hub checks that prefix only while downloading; a file already in the cache is
trusted as it is, so here a cached file is hashed too (a fraction of a second for DenseNet-121) and
refused if it does not match: a file copied in by hand, cut short or altered never loads silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from densenet.errors import DenseNetError
from densenet.models.compat import load_into

# Our registry names with published torchvision weights (densenet264 has none).
PRETRAINED = ("densenet121", "densenet161", "densenet169", "densenet201")


def is_pretrained_name(name: Any) -> bool:
    return isinstance(name, str) and name in PRETRAINED


def torchvision_weights(name: str):
    """torchvision's default weights entry (a WeightsEnum member) for one of PRETRAINED."""
    if not is_pretrained_name(name):
        raise DenseNetError(f"no published ImageNet weights for {name!r}; pretrained=True works for "
                            f"{', '.join(PRETRAINED)}")
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def cache_path(weights) -> Path:
    """Where torch.hub keeps (and looks for) the weights file of this entry."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _check_cached_hash(path: Path, url: str) -> None:
    match = torch.hub.HASH_REGEX.search(path.name)
    if not match:
        return
    prefix = match.group(1)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise DenseNetError(f"{path} does not match the hash in its name ({prefix}...; got "
                            f"{digest.hexdigest()[:len(prefix)]}): a partial or altered file; delete it and "
                            f"download {url} again")


def pretrained_state_dict(name: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's weights for ``name``: from the cache, else downloaded (hash checked)."""
    weights = torchvision_weights(name)
    path = cache_path(weights)
    if path.is_file():
        _check_cached_hash(path, weights.url)
    try:
        # torch.hub announces a download on stdout; keep stdout for results (predict --json, evaluate --json).
        # weights_only: torch.hub's default is full unpickling, which would run code in a forged cached file
        # (the name holds only 8 hex digits of the hash, few enough to match by brute force).
        with contextlib.redirect_stdout(sys.stderr):
            state = weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights-only unpickling refused it: never run a stranger's code
        raise DenseNetError(f"refusing to load {path}: it holds objects other than tensors and plain values; "
                            f"delete it and download {weights.url} again") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:  # URLError is an OSError; a bad hash RuntimeError
        reason = str(getattr(exc, "reason", "") or exc).strip().splitlines()
        reason = reason[0] if reason else type(exc).__name__
        if path.is_file():  # it was in the cache (and hashed right) but torch could not read it
            raise DenseNetError(f"cannot read the cached weights {path}: {reason}; delete it and retry") from exc
        raise DenseNetError(f"cannot download {name} weights from {weights.url} ({reason}); download that file "
                            f"elsewhere and put it at {path}") from exc
    if not isinstance(state, dict):
        raise DenseNetError(f"{path} does not hold a state dict")
    return state


def pretrained_metadata(name: str) -> dict[str, Any]:
    """What predict, evaluate and export need, as in our own weight files: classes, mean, std, input size."""
    weights = torchvision_weights(name)
    preprocess = weights.transforms()
    crop = preprocess.crop_size
    return {"model": name, "classes": list(weights.meta["categories"]), "mean": list(preprocess.mean),
            "std": list(preprocess.std), "input_size": int(crop[0] if isinstance(crop, list | tuple) else crop),
            "dataset": "imagenet", "source": weights.url}


def load_pretrained(model: torch.nn.Module, name: str, progress: bool = True) -> dict[str, Any]:
    """Load ``name``'s ImageNet weights into ``model`` (a fresh classifier when its class count differs).

    Returns the metadata, which is also kept as ``model.pretrained_cfg`` (timm's attribute name).
    """
    state = pretrained_state_dict(name, progress)
    metadata = pretrained_metadata(name)
    own = model.state_dict()
    classifier = [k for k in state if k.startswith("classifier.")]
    if any(k not in own or own[k].shape != state[k].shape for k in classifier):
        # Fine-tuning (another class count, or none): everything but the classifier, which stays as initialised.
        state = {k: v for k, v in state.items() if k not in classifier}
        state.update({k: v for k, v in own.items() if k.startswith("classifier.")})
        metadata.pop("classes")
    conv0 = "features.conv0.weight"
    if conv0 in own and conv0 in state and own[conv0].shape[1] != state[conv0].shape[1]:
        state = dict(state)
        state[conv0] = adapt_input_conv(own[conv0].shape[1], state[conv0])
        metadata["mean"] = _per_channel(metadata["mean"], own[conv0].shape[1])
        metadata["std"] = _per_channel(metadata["std"], own[conv0].shape[1])
    load_into(model, state, source=f"{name} weights ({cache_path(torchvision_weights(name))})")
    metadata["config"] = dict(getattr(model, "config", {}))
    model.pretrained_cfg = metadata
    return metadata


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """RGB first-layer filters for another number of input channels, as timm adapts them: summed over R, G, B
    for one channel (a gray image then gives the response of the same image in colour); for more channels,
    R, G, B repeated and scaled by 3 / in_chans so the response keeps its size."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _per_channel(values: list[float], in_chans: int) -> list[float]:
    if in_chans == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(in_chans)]
