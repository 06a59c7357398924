"""Weight files: ours are safetensors with JSON metadata; torchvision's and timm's load as they are.

Our file holds the state dict and, under the metadata key ``densenet``, a JSON object with what
predict, evaluate and export need and nothing else should have to guess::

    {"model": "densenet40_k12", "config": {...DenseNet(**config)...}, "classes": ["airplane", ...],
     "mean": [...], "std": [...], "input_size": 32, "dataset": "cifar10"}

Other files (torchvision/timm ``.pth`` or ``.safetensors``, our training checkpoints) are read with
weights-only unpickling or safetensors, never by running pickled code; their architecture is inferred
from the state dict's shapes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from densenet.data.registry import DATASETS
from densenet.errors import DenseNetError
from densenet.files import atomic_write, safe_load
from densenet.models import resnet
from densenet.models.compat import load_into, remap_legacy_keys  # noqa: F401 - load_into: weights' public face
from densenet.models.densenet import DenseNet
from densenet.models.registry import MODELS

METADATA_KEY = "densenet"
WEIGHTS_NAME = "model.safetensors"


def save_weights(model: DenseNet, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write the model's state dict and metadata to a safetensors file, atomically."""
    meta = dict(metadata)
    meta["config"] = dict(model.config)
    meta.setdefault("memory_efficient", False)  # the file holds the standard graph's parameters either way
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
    try:
        atomic_write(path, lambda f: f.write(blob))
    except OSError as exc:
        raise DenseNetError(f"could not write weights {path}: {exc.strerror or exc}") from exc


def resolve(path: str | os.PathLike) -> Path:
    """A weights file, or a run folder (its model.safetensors, else its last checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, "checkpoint_last.pt", "checkpoint_best.pt"):
            if (path / name).is_file():
                return path / name
        raise DenseNetError(f"{path} is a folder without {WEIGHTS_NAME} or a checkpoint")
    if not path.is_file():
        if str(path) in MODELS:
            from densenet.models.pretrained import PRETRAINED

            raise DenseNetError(f"no weights file {path}, and {path} has no published ImageNet weights "
                                f"(the names that load them: {', '.join(PRETRAINED)})")
        raise DenseNetError(f"weights file {path} does not exist")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Our JSON metadata of a safetensors file ({} for other files)."""
    path = resolve(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as exc:
        raise DenseNetError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise DenseNetError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise DenseNetError(f"{path}: its {METADATA_KEY!r} metadata is not a JSON object")
    return metadata


def _read(path: Path, map_location) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, metadata) of any supported file."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(map_location)), read_metadata(path)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise DenseNetError(f"{path} is not a readable safetensors file: {exc}") from exc
    obj = safe_load(path, map_location, what="weights file")
    metadata: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # our training checkpoint
        metadata = dict(obj.get("metadata") or {})
        if "model_config" in obj:
            metadata.setdefault("config", obj["model_config"])
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DenseNetError(f"{path} does not hold a state dict of tensors")
    return obj, metadata


def _pretrained_name(path: str | os.PathLike) -> str | None:
    """The model name when ``path`` names torchvision's published weights (densenet121...) and no such file exists."""
    from densenet.models.pretrained import is_pretrained_name

    return str(path) if is_pretrained_name(str(path)) and not Path(path).exists() else None


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of any supported file (or pretrained model name), with legacy key names mapped to ours."""
    name = _pretrained_name(path)
    if name:
        from densenet.models.pretrained import pretrained_state_dict

        return remap_legacy_keys({k: v.to(map_location) for k, v in pretrained_state_dict(name).items()})
    state, _ = _read(resolve(path), map_location)
    return remap_legacy_keys(state)


_BLOCK = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.conv2\.weight$")


def infer_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """DenseNet constructor arguments that fit a state dict's keys and shapes (the spatial dimensions from the
    first convolution's kernel: (out, in, k) for signals, (out, in, k, k) for images, (out, in, k, k, k) for
    volumes)."""
    try:
        conv0 = state["features.conv0.weight"]
        layers: dict[int, int] = {}
        for key in state:
            m = _BLOCK.match(key)
            if m:
                layers[int(m[1])] = max(layers.get(int(m[1]), 0), int(m[2]))
        growth = state["features.denseblock1.denselayer1.conv2.weight"].shape[0]
        conv1 = state.get("features.denseblock1.denselayer1.conv1.weight")
        compression = 1.0
        if "features.transition1.conv.weight" in state:
            out_c, in_c = state["features.transition1.conv.weight"].shape[:2]
            compression = 0.5 if out_c == in_c // 2 else out_c / in_c
        classifier = state.get("classifier.weight")
    except KeyError as exc:
        raise DenseNetError(f"the state dict is not a DenseNet's (no {exc.args[0]})") from exc
    return dict(growth_rate=int(growth), block_config=[layers[i] for i in sorted(layers)],
                num_init_features=int(conv0.shape[0]),
                bottleneck_width=int(conv1.shape[0] // growth) if conv1 is not None else None,
                # a "strided" stem's 3x3 kernel looks like the CIFAR stem's: only metadata tells them apart
                compression=compression, stem="imagenet" if conv0.shape[-1] == 7 else "cifar",
                in_chans=int(conv0.shape[1]), num_classes=int(classifier.shape[0]) if classifier is not None else 0,
                drop_rate=0.0, spatial_dims=int(conv0.dim() - 2))


def model_name_for(config: dict[str, Any]) -> str:
    """The registry name whose architecture equals config, or a descriptive densenet[_bc]{L}_k{k}-like one."""
    keys = ("growth_rate", "block_config", "num_init_features", "bottleneck_width", "compression", "stem")
    for name, ref in MODELS.items():
        if all(list(ref[k]) == list(config[k]) if k == "block_config" else ref[k] == config[k] for k in keys):
            return name
    blocks = "-".join(map(str, config["block_config"]))
    return f"densenet({config['stem']}, k={config['growth_rate']}, blocks {blocks})"


def load_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DenseNet, dict]:
    """Build the model a weights file (or run folder) describes and load it strictly: (model, metadata).

    A pretrained model name (densenet121, 161, 169, 201) that is not a file loads torchvision's ImageNet weights.
    """
    name = _pretrained_name(path)
    if name:
        from densenet.models.registry import create_model

        model = create_model(name, pretrained=True)
        return model.to(map_location), dict(model.pretrained_cfg)
    path = resolve(path)
    state, metadata = _read(path, map_location)
    state = remap_legacy_keys(state)
    config = metadata.get("config") or infer_config(state)
    metadata = dict(metadata)
    metadata["config"] = config
    if resnet.is_resnet_config(config):  # a comparison ResNet's run (models/resnet.py, the paper's Figure 4)
        model = resnet.build_resnet(config)
        load_into(model, state, source=str(path))
        return model.to(map_location), metadata
    metadata.setdefault("model", model_name_for(config))
    if config["stem"] == "imagenet" and config["num_classes"] == 1000 and config.get("spatial_dims", 2) == 2:
        # ImageNet weights from elsewhere
        imagenet = DATASETS["imagenet"]
        metadata.setdefault("mean", list(imagenet.mean))
        metadata.setdefault("std", list(imagenet.std))
        metadata.setdefault("input_size", imagenet.input_size)
        metadata.setdefault("dataset", imagenet.name)
        if "classes" not in metadata:
            from torchvision.models import DenseNet121_Weights

            metadata["classes"] = list(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])
    try:
        model = DenseNet(**config)
    except (TypeError, ValueError) as exc:
        raise DenseNetError(f"{path}: its metadata does not describe a valid DenseNet: {exc}") from exc
    load_into(model, state, source=str(path))
    return model.to(map_location), metadata
