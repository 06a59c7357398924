"""A DenseNet as an ONNX graph: the one exporter behind ``densenet export --format onnx`` and the ONNX engines.

    blob = onnx_bytes(model, example=torch.randn(2, 3, 32, 32), metadata={"classes": [...]})

The graph takes a float batch ``images`` (N, C, H, W) and returns ``logits`` (N, classes); the batch axis is
dynamic. Metadata given is stored as JSON strings in the file's ``metadata_props``.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import torch
from torch import Tensor, nn

OPSET = 17
METADATA_KEYS = ("model", "classes", "mean", "std", "input_size", "dataset", "config")


def onnx_bytes(model: nn.Module, example: Tensor, metadata: dict[str, Any] | None = None) -> bytes:
    """``model`` (put in eval mode) traced on ``example`` as a serialised ONNX model with a dynamic batch."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter: deprecated in favour of dynamo=True, which gives the same graph
        # here but takes 10-20 s instead of under one on a small DenseNet.
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example.contiguous(),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    if not metadata:
        return buffer.getvalue()
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    for key in METADATA_KEYS:
        if key in metadata:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(metadata[key])
    return proto.SerializeToString()
