"""Augmentation of a whole uint8 batch at once, on the device that trains.

The small data sets (CIFAR, SVHN, digits) live in memory as uint8 tensors of shape (N, C, H, W). A
training step takes a batch of them to the device and augments it there with a few tensor operations,
so loading and augmenting never limit a step, and the randomness comes from one explicit generator
(derived from the seed and the epoch) that a resumed run can recreate exactly.

The paper's C10+/C100+ augmentation ("standard"): zero-pad 4 pixels on each side, take a random
H x W crop, flip horizontally with probability 1/2. A smaller crop (``size``) keeps the scale of the
image and shows less of it: the cheap early epochs of progressive resizing (``--small-crop``).

Test-time augmentation (``--tta``) averages the predictions over views of each normalised test image:
``flip`` the image and its mirror image, ``flip-shift`` those two and each of them moved one pixel
down-right and one up-left, the uncovered edge filled with what zero padding of the raw image becomes
(the shifts a training crop makes, smaller).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4, size: int | None = None,
                  flips: Tensor | None = None) -> Tensor:
    """A random crop of the zero-padded batch, flipped left-right for half the images; same dtype, and the
    same shape unless ``size`` asks for smaller ``size`` x ``size`` crops (at most the image's side).
    ``flips`` (N booleans), when given, says which images to flip instead of drawing it (``alternate_flips``)."""
    n, c, h, w = images.shape
    if n == 0:
        return images
    if size is not None:
        if not 0 < size <= min(h, w):
            raise ValueError(f"crop size {size} does not fit {h}x{w} images")
        h = w = size
    # Draw on the generator's device (CPU) so the numbers do not depend on where training runs.
    spans = (images.shape[2] + 2 * padding - h + 1, images.shape[3] + 2 * padding - w + 1)
    if spans[0] == spans[1]:  # one draw for both axes, as always for square images
        offsets = torch.randint(0, spans[0], (2, n), generator=generator)
    else:
        offsets = torch.stack([torch.randint(0, span, (n,), generator=generator) for span in spans])
    offsets = offsets.to(images.device)
    flips = ((torch.rand(n, generator=generator) < 0.5) if flips is None else flips).to(images.device, torch.bool)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (n, h)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def alternate_flips(first: Tensor, index: Tensor, epoch: int) -> Tensor:
    """Which images of a batch to flip under --flip alternate: ``first`` (one boolean per image of the split,
    drawn once per run) in even epochs, its negation in odd ones, for the images at ``index``.

    The derandomised flip of Jordan, "94% on CIFAR-10 in 3.29 seconds" (2024): random flips show an image the
    same way round in two successive epochs half the time; alternating shows every image both ways in every two
    epochs, which a short run, seeing each image a few dozen times, has the most use for.
    """
    return first[index] ^ bool(epoch % 2)


TTA_VIEWS = {"none": 1, "flip": 2, "flip-shift": 6}


def tta_views(images: Tensor, mode: str, fill: Tensor) -> Tensor:
    """The views ``mode`` averages, (N, V, C, H, W), of a normalised (N, C, H, W) batch or of one that already
    has views (N, V0, C, H, W): V = V0 x TTA_VIEWS[mode]. ``fill`` (C,) is the padded value per channel."""
    views = images if images.dim() == 5 else images[:, None]
    if mode == "none":
        return views
    views = torch.cat([views, views.flip(-1)], dim=1)
    if mode == "flip-shift":
        views = torch.cat([views, _shift(views, 1, fill), _shift(views, -1, fill)], dim=1)
    return views


def _shift(images: Tensor, step: int, fill: Tensor) -> Tensor:
    """The images moved ``step`` pixels down and right (negative: up and left), the uncovered edge filled."""
    out = fill.to(images.dtype).view(-1, 1, 1).expand(images.shape).clone()
    if step > 0:
        out[..., step:, step:] = images[..., :-step, :-step]
    else:
        out[..., :step, :step] = images[..., -step:, -step:]
    return out


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype=torch.float32) -> Tensor:
    """uint8 (N, C, H, W) -> float, divided by 255, minus the per-channel mean, over the per-channel std."""
    mean_t = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / 255.0 - mean_t) / std_t


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a uint8 (N, C, H, W) set, in the 0..1 range."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += (part * part).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
