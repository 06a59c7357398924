"""A tiny DenseNet-BC trained for a few steps on scikit-learn's digits, saved as a run folder would save it."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import densenet
from densenet.data.augment import channel_stats, normalize
from densenet.models.weights import save_weights


def digit_images(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 8, 8) digit scans (values 0..16 scaled to 0..255, as the digits data set does) and labels."""
    x, y = load_digits(return_X_y=True)
    images = np.rint(x[:n] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return torch.from_numpy(images), torch.from_numpy(y[:n]).long()


def train_tiny(folder: Path) -> tuple[densenet.DenseNet, dict]:
    """densenet_bc16_k4 (k=4, 2 bottleneck layers per block) after 40 SGD steps, saved as folder/model.safetensors.

    Trained once per test process; every caller gets its own copy.
    """
    model, metadata = _trained()
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "model.safetensors", metadata)
    return copy.deepcopy(model), dict(metadata)


@functools.cache
def _trained(steps: int = 40) -> tuple[densenet.DenseNet, dict]:
    torch.manual_seed(0)
    images, labels = digit_images(512)
    mean, std = channel_stats(images)
    model = densenet.create_model("densenet_bc16_k4", num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    inputs = normalize(images, mean, std)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from two threads, and loses 10x when the cores are busy
    try:
        for _ in range(steps):
            index = torch.randint(0, len(labels), (64,))
            loss = torch.nn.functional.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    metadata = {"model": "densenet_bc16_k4", "classes": [str(d) for d in range(10)], "mean": mean, "std": std,
                "input_size": 8, "dataset": "digits"}
    return model, metadata
