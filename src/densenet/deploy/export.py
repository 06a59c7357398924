"""``densenet export WEIGHTS_OR_RUN_DIR --format onnx|torchscript|exported --out FILE``.

    densenet export runs/digits --format onnx --out digits.onnx
    densenet export densenet121.pth --format exported --out densenet121.pt2   # torch.export, torch.export.load
    densenet export densenet121 --out d121.onnx      # torchvision's ImageNet weights, by name

Every format takes a float batch (N, C, H, W) normalised as the weights' metadata says and returns the
logits (N, classes); the batch dimension is dynamic. The metadata (class names, mean, std, input size)
travels inside the file: ONNX metadata_props, an extra file ``densenet.json`` for the other two.

The command checks its own output before it keeps it: the written file is loaded again (ONNX in
onnxruntime) and its logits are compared with PyTorch's at two batch sizes other than the traced one;
a difference above 1e-4 fails the export and no file is left behind. A memory-efficient model is
exported as the standard graph (same parameters, same results; the recomputation only matters for
training).
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densenet.errors import DenseNetError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
TOLERANCE = 1e-4
CHECK_BATCHES = (1, 3)  # the example batch is 2: a file that kept it fixed fails the check
_META_FILE = "densenet.json"


def input_shape(model: nn.Module, metadata: dict[str, Any]) -> tuple[int, ...]:
    """(channels, height, width) of one input image, (channels, depth, height, width) of a volume, (channels,
    length) of a signal: the metadata's input size along each axis, else the paper's for the form."""
    size = int(metadata.get("input_size") or (224 if getattr(model, "stem", "") == "imagenet" else 32))
    dims = int(getattr(model, "config", {}).get("spatial_dims", 2))
    return (int(getattr(model, "in_chans", 3)), *[size] * dims)


def check_output_path(out: str | os.PathLike) -> Path:
    """An output file that can be written, or a one-line reason why not (before any work is done)."""
    out = Path(out)
    if out.is_dir():
        raise DenseNetError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.onnx'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DenseNetError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DenseNetError(f"cannot write {out}: folder {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise DenseNetError(f"cannot write {out}: the existing file is read-only")
    return out


def export_model(model: nn.Module, metadata: dict[str, Any], fmt: str, out: str | os.PathLike) -> float:
    """Write ``model`` as ``fmt`` to ``out`` atomically, after checking the file; the largest logit difference."""
    from densenet.files import atomic_write

    if fmt not in FORMATS:
        raise DenseNetError(f"unsupported export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_output_path(out)
    from densenet.models import set_block_impl

    # A copy: the caller's model keeps its device, mode and block implementation. The plain blocks are the
    # standard graph (concatenations), with nothing custom to trace and the same results.
    model = copy.deepcopy(model).cpu().eval()
    set_block_impl(model, "plain")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *input_shape(model, metadata), generator=generator)
    checks = [torch.randn(n, *example.shape[1:], generator=generator) for n in CHECK_BATCHES]
    with torch.no_grad():
        expected = [model(x) for x in checks]
    blob = _WRITERS[fmt](model, example, metadata)
    worst = [0.0]

    def write_and_check(f) -> None:
        f.write(blob)
        f.flush()
        worst[0] = _check(fmt, f.name, checks, expected)  # the file on disk, before it is renamed into place

    try:
        atomic_write(out, write_and_check)
    except OSError as exc:
        raise DenseNetError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return worst[0]


def _onnx(model: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    from densenet.inference.onnx_export import onnx_bytes

    return onnx_bytes(model, example, metadata)


def _torchscript(model: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated but still what C++ (libtorch) users load
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={_META_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _exported(model: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={_META_FILE: json.dumps(metadata)})
    return buffer.getvalue()


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "exported": _exported}


def _check(fmt: str, path: str, inputs: list[Tensor], expected: list[Tensor]) -> float:
    """Load the written file with its own runtime and compare its logits with PyTorch's."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = torch.jit.load(path, map_location="cpu")
    else:
        # From a buffer: given a path, torch.export.load wants the .pt2 suffix, and the temporary file has another.
        run = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()
    worst = 0.0
    with torch.no_grad():
        for x, want in zip(inputs, expected, strict=True):
            got = run(x)
            if tuple(got.shape) != tuple(want.shape):
                raise DenseNetError(f"the {fmt} file gives logits of shape {tuple(got.shape)} for a batch of "
                                    f"{x.shape[0]}, expected {tuple(want.shape)}; nothing written")
            worst = max(worst, float((got.float() - want).abs().max()))
    if not worst <= TOLERANCE:
        raise DenseNetError(f"the {fmt} file's logits differ from PyTorch's by {worst:.2e} (> {TOLERANCE:g}); "
                            f"nothing written")
    return worst
