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

Volumes (N, C, D, H, W), e.g. MedMNIST 3D CT, get ``shift_flip_3d``: each volume moved a few voxels along
every axis (zero filled, the 3D analogue of pad-and-crop) and flipped along each axis with probability 1/2;
``augment_batch`` picks the 2D or the 3D form from the batch's spatial dimensions. ``normalize`` and
``channel_stats`` take either shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from densenet.errors import ConfigError


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


def shift_flip_3d(volumes: Tensor, generator: torch.Generator, shift: int = 2,
                  flip_axes: Sequence[int] = (0, 1, 2)) -> Tensor:
    """Each volume of a (N, C, D, H, W) batch moved by a random -shift..shift voxels along every axis (the
    uncovered side zero, as a crop of the zero-padded volume leaves it) and flipped along each of ``flip_axes``
    (0 = D, 1 = H, 2 = W) with probability 1/2, independently per volume and axis; same dtype and shape.

    The 3D form of ``pad_crop_flip`` (MONAI's RandFlip and a small RandAffine translation do this per volume on
    the CPU; here it is one gather for the whole batch on the training device). The draws are made on the
    generator's device (CPU), so they do not depend on where training runs.
    """
    n = volumes.shape[0]
    if volumes.dim() != 5:
        raise ValueError(f"shift_flip_3d takes (N, C, D, H, W) volumes, not shape {tuple(volumes.shape)}")
    if n == 0:
        return volumes
    if shift < 0 or any(axis not in (0, 1, 2) for axis in flip_axes):
        raise ValueError(f"shift must be >= 0 and flip_axes among 0, 1, 2; got {shift} and {tuple(flip_axes)}")
    offsets = torch.randint(0, 2 * shift + 1, (3, n), generator=generator).to(volumes.device)
    flips = (torch.rand(3, n, generator=generator) < 0.5).to(volumes.device)
    padded = torch.nn.functional.pad(volumes, (shift,) * 6).movedim(1, -1)  # (n, D+2s, H+2s, W+2s, c)
    index = []
    for axis, side in enumerate(volumes.shape[2:]):
        positions = offsets[axis, :, None] + torch.arange(side, device=volumes.device)  # (n, side)
        if axis in flip_axes:
            positions = torch.where(flips[axis, :, None], positions.flip(1), positions)
        index.append(positions)
    batch = torch.arange(n, device=volumes.device)[:, None, None, None]
    out = padded[batch, index[0][:, :, None, None], index[1][:, None, :, None], index[2][:, None, None, :]]
    return out.movedim(-1, 1).contiguous()


def augment_batch(images: Tensor, generator: torch.Generator, padding: int = 4, shift_3d: int = 2) -> Tensor:
    """The standard augmentation for the batch's dimensionality: ``pad_crop_flip`` (the paper's, 2D, unchanged)
    for (N, C, H, W) images, ``shift_flip_3d`` for (N, C, D, H, W) volumes."""
    if images.dim() == 5:
        return shift_flip_3d(images, generator, shift_3d)
    return pad_crop_flip(images, generator, padding)


def alternate_flips(first: Tensor, index: Tensor, epoch: int) -> Tensor:
    """Which images of a batch to flip under --flip alternate: ``first`` (one boolean per image of the split,
    drawn once per run) in even epochs, its negation in odd ones, for the images at ``index``.

    The derandomised flip of Jordan, "94% on CIFAR-10 in 3.29 seconds" (2024): random flips show an image the
    same way round in two successive epochs half the time; alternating shows every image both ways in every two
    epochs, which a short run, seeing each image a few dozen times, has the most use for.
    """
    return first[index] ^ bool(epoch % 2)


TTA_VIEWS = {"none": 1, "flip": 2, "flip-shift": 6}


def check_tta(mode: str, volumes: bool) -> None:
    """A ConfigError for test-time augmentation the data cannot take: flip-shift moves 2D images one pixel."""
    if volumes and mode == "flip-shift":
        raise ConfigError("--tta flip-shift moves 2D images one pixel; for volumes use --tta flip (each volume and "
                          "its mirror) or none")


def tta_views(images: Tensor, mode: str, fill: Tensor, volumes: bool = False) -> Tensor:
    """The views ``mode`` averages, (N, V, C, H, W), of a normalised (N, C, H, W) batch or of one that already
    has views (N, V0, C, H, W): V = V0 x TTA_VIEWS[mode]. ``fill`` (C,) is the padded value per channel.
    ``volumes``: a (N, C, D, H, W) batch of volumes, viewed as (N, V, C, D, H, W); "flip" mirrors the last axis
    (W), as the training flips do (among others); "flip-shift" is for images only."""
    check_tta(mode, volumes)
    views = images[:, None] if volumes or images.dim() == 4 else images
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
    """uint8 (N, C, H, W) or (N, C, D, H, W) -> float, divided by 255, minus the per-channel mean, over the
    per-channel std."""
    shape = (1, -1) + (1,) * (images.dim() - 2)
    mean_t = torch.tensor(mean, dtype=dtype, device=images.device).view(shape)
    std_t = torch.tensor(std, dtype=dtype, device=images.device).view(shape)
    return (images.to(dtype) / 255.0 - mean_t) / std_t


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a uint8 (N, C, H, W) or (N, C, D, H, W) set, in the 0..1 range."""
    if images.dim() > 4:
        return _volume_stats(images)
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


def _volume_stats(volumes: Tensor) -> tuple[list[float], list[float]]:
    """channel_stats of volumes from a histogram of the 256 values per channel: exact, and 10x faster than
    summing float64 copies of a 300-million-voxel set (AdrenalMNIST3D at 64^3: 16 s -> 2.6 s here)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    per_volume = max(1, volumes[0, 0].numel())
    mean, std = [], []
    for c in range(volumes.shape[1]):
        counts = torch.zeros(256, dtype=torch.float64)
        step = max(1, 2**24 // per_volume)
        for start in range(0, volumes.shape[0], step):
            part = volumes[start:start + step, c].reshape(-1)
            counts += torch.bincount(part, minlength=256).to(torch.float64)
        n = max(float(counts.sum()), 1.0)
        m = float((counts * values).sum()) / n
        variance = float((counts * values * values).sum()) / n - m * m
        mean.append(round(m, 4))
        std.append(round(max(variance, 1e-24) ** 0.5, 4))
    return mean, std
