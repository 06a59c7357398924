"""Using a trained DenseNet: ``densenet predict`` (top-k classes of image files) and ``densenet export``
(ONNX, TorchScript, torch.export), both from a weights file or a run folder and its metadata alone."""
