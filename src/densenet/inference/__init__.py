"""Fast inference: BN folding, torch.compile, ONNX Runtime and OpenVINO in fp32 and int8 (``build_engine``)."""

from densenet.inference.engines import CHOICES, ENGINES, Engine, auto_order, build_engine
from densenet.inference.fold import fold_batchnorm

__all__ = ["CHOICES", "ENGINES", "Engine", "auto_order", "build_engine", "fold_batchnorm"]
