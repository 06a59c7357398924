"""Benchmarks: ``densenet bench speed`` (against torchvision) and ``densenet bench memory``."""
