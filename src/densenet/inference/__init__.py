"""Fast inference: BN folding, torch.compile, ONNX Runtime fp32 and int8 (``build_engine``)."""

from densenet.inference.engines import ENGINES, build_engine
from densenet.inference.fold import fold_batchnorm

__all__ = ["ENGINES", "build_engine", "fold_batchnorm"]
