"""Ways to run a trained DenseNet forward on a CPU, each a callable ``images (N,C,H,W) float -> logits``.

- ``eager``: the model as it is, in eval mode;
- ``folded``: eager with the foldable BNs merged into convolutions (see ``densenet.inference.fold``);
- ``compile``: the folded model through ``torch.compile`` (inductor, weights frozen);
- ``onnxruntime``: the folded model exported to ONNX, run by ONNX Runtime (which fuses BN-ReLU itself);
- ``onnxruntime-int8``: that ONNX graph with static post-training int8 quantisation (QDQ, per-channel weights),
  calibrated on images you give (``calibration``); random images if none (fine for speed, not accuracy).

    engine = build_engine(model, "onnxruntime-int8", example=images[:64], calibration=train_images[:512])
    logits = engine(images)
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from densenet.errors import ConfigError
from densenet.inference.fold import fold_batchnorm
from densenet.models.densenet import DenseNet

ENGINES = ("eager", "folded", "compile", "onnxruntime", "onnxruntime-int8")


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Path:
    """The model as an ONNX file with a dynamic batch axis (TorchScript exporter: quick and dependable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(model.eval(), (example[:1].contiguous(),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images, in batches."""

    def __init__(self, images: Tensor, batch_size: int = 32) -> None:
        self.batches = iter([{"images": b.contiguous().numpy()} for b in images.split(batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _ort_session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(session.run(None, {"images": array})[0])
    return run


def quantize_onnx(source: Path, target: Path, calibration: Tensor) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations) calibrated on images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm"])
    return target


def build_engine(model: DenseNet, engine: str, example: Tensor, device: torch.device | str = "cpu",
                 channels_last: bool = False, calibration: Tensor | None = None,
                 threads: int | None = None) -> Callable[[Tensor], Tensor]:
    """A callable running ``model`` forward (eval mode) through ``engine``; see the module docstring."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown inference engine {engine!r}; choose one of {', '.join(ENGINES)}")
    device = torch.device(device)
    if engine == "eager":
        net = model.to(device).eval()
    else:
        net = fold_batchnorm(model).to(device)
    if engine in ("eager", "folded", "compile"):
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if engine == "compile":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # weights become constants: inductor folds and prepacks them
            net = torch.compile(net)
        return net
    if device.type != "cpu":
        raise ConfigError(f"--engine {engine} runs on the CPU only; use --device cpu or --engine eager/compile")
    workdir = Path(tempfile.mkdtemp(prefix="densenet-onnx-"))
    path = export_onnx(net.cpu(), example.cpu(), workdir / "model.onnx")
    if engine == "onnxruntime-int8":
        if calibration is None:
            calibration = torch.randn(64, *example.shape[1:])
        path = quantize_onnx(path, workdir / "model.int8.onnx", calibration.cpu())
    return _ort_session(path, threads)
