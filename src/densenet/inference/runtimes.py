"""The ONNX graph run by ONNX Runtime or OpenVINO (optional packages), fp32 or int8 quantised on images.

Each ``*_runner(path, threads)`` loads a model file and returns ``images (N,C,H,W) float -> logits``; each
``quantize_*(source, target, calibration)`` writes an int8 model calibrated on a tensor of images.
``densenet.inference.engines`` chooses between them; this module only knows how to drive each runtime.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Runner = Callable[[Tensor], Tensor]


def _array(images: Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.detach().float().cpu().numpy())


# --- ONNX Runtime -------------------------------------------------------------------------------------------

def onnxruntime_runner(path: Path, threads: int) -> Runner:
    """An ONNX Runtime CPU session: every graph optimisation (NCHWc layouts, Conv+ReLU fusion), one pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of layers: nothing to run in parallel
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"images": _array(images)})[0])
    return run


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images, in batches."""

    def __init__(self, images: Tensor, batch_size: int = 32) -> None:
        self.batches = iter([{"images": _array(b)} for b in images.split(batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize_onnxruntime(source: Path, target: Path, calibration: Tensor) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations) calibrated on images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm"])
    prepared.unlink(missing_ok=True)
    return target


# --- OpenVINO -----------------------------------------------------------------------------------------------

@functools.cache
def _openvino_core():
    """One OpenVINO runtime per process: each Core keeps its own CPU plugin and thread pools."""
    import openvino as ov

    return ov.Core()


def openvino_runner(path: Path, threads: int, cache_dir: Path | None = None, precision: str = "f32") -> Runner:
    """An OpenVINO CPU model (an ONNX file or IR .xml) compiled for the lowest latency of one request.

    One compiled model per batch size, made on first use: static shapes ran 14% faster than the dynamic batch
    (BC-40 k=12, batch 64). The precision is asked for explicitly: on CPUs with native bf16 OpenVINO would
    otherwise compute in bf16. ``cache_dir`` keeps the compiled blobs, so that the next process skips compiling.
    """
    core = _openvino_core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    source = core.read_model(str(path))  # now: the file may be a temporary one
    requests: dict[tuple[int, ...], tuple] = {}

    def request_for(shape: tuple[int, ...]):
        if shape not in requests:
            model = source.clone()
            model.reshape({0: list(shape)})
            compiled = core.compile_model(model, "CPU", config)
            requests[shape] = (compiled.create_infer_request(), compiled.output(0))
        return requests[shape]

    def run(images: Tensor) -> Tensor:
        array = _array(images)
        request, output = request_for(array.shape)
        return torch.from_numpy(np.array(request.infer({0: array})[output]))
    return run


_NNCF_SCRIPT = """
import sys
import nncf, numpy as np, openvino as ov
source, target, samples = sys.argv[1:4]
images = np.load(samples)
model = ov.Core().read_model(source)
quantized = nncf.quantize(model, nncf.Dataset([images[i:i + 1] for i in range(len(images))]),
                          subset_size=len(images), preset=nncf.QuantizationPreset.PERFORMANCE)
ov.save_model(quantized, target, compress_to_fp16=False)
"""


def quantize_openvino(source: Path, target: Path, calibration: Tensor) -> Path:
    """int8 by NNCF's post-training quantisation (per-channel weights, calibrated activations), saved as IR.

    NNCF runs in a child process: loaded into this one, it left the process to die of a segmentation fault at
    a later fork (a test suite's subprocess.run, 2026-11-29).
    """
    import subprocess
    import sys

    samples = target.with_name("calibration.npy")
    np.save(samples, _array(calibration))
    try:
        done = subprocess.run([sys.executable, "-c", _NNCF_SCRIPT, str(source), str(target), str(samples)],
                              capture_output=True, text=True)
    finally:
        samples.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"NNCF quantisation failed: {done.stderr.strip()[-1500:]}")
    return target
