"""3D augmentation against a per-volume NumPy reference, the 2D path unchanged, volume statistics, and the
task every Data record now carries."""

import numpy as np
import pytest
import torch

from densenet.data.augment import augment_batch, channel_stats, normalize, pad_crop_flip, shift_flip_3d
from densenet.data.datasets import Data, Split, subset
from densenet.data.task import Task


def reference_shift_flip(volumes: np.ndarray, seed: int, shift: int) -> np.ndarray:
    """Per volume with NumPy: the same draws as shift_flip_3d, applied by pad, slice and flip."""
    generator = torch.Generator().manual_seed(seed)
    n = volumes.shape[0]
    offsets = torch.randint(0, 2 * shift + 1, (3, n), generator=generator).numpy()
    flips = (torch.rand(3, n, generator=generator) < 0.5).numpy()
    out = np.empty_like(volumes)
    for i, volume in enumerate(volumes):
        padded = np.pad(volume, ((0, 0),) + ((shift, shift),) * 3)
        d, h, w = offsets[:, i]
        crop = padded[:, d:d + volume.shape[1], h:h + volume.shape[2], w:w + volume.shape[3]]
        for axis in range(3):
            if flips[axis, i]:
                crop = np.flip(crop, axis=axis + 1)
        out[i] = crop
    return out


@pytest.mark.parametrize("shift", [0, 2])
def test_shift_flip_3d_matches_a_per_volume_reference(shift):
    volumes = torch.randint(0, 256, (5, 2, 4, 5, 6), dtype=torch.uint8)
    out = shift_flip_3d(volumes, torch.Generator().manual_seed(7), shift)
    assert out.shape == volumes.shape and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), reference_shift_flip(volumes.numpy(), 7, shift))
    assert not torch.equal(out, volumes)  # something moved or flipped


def test_augment_batch_keeps_the_2d_path_bit_identical():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    expected = pad_crop_flip(images, torch.Generator().manual_seed(1), 4)
    assert torch.equal(augment_batch(images, torch.Generator().manual_seed(1)), expected)
    volumes = torch.randint(0, 256, (3, 1, 4, 4, 4), dtype=torch.uint8)
    assert torch.equal(augment_batch(volumes, torch.Generator().manual_seed(1)),
                       shift_flip_3d(volumes, torch.Generator().manual_seed(1), 2))


def test_volume_normalisation_and_statistics():
    volumes = torch.randint(0, 256, (3, 2, 4, 5, 6), dtype=torch.uint8)
    x = volumes.double() / 255
    mean, std = channel_stats(volumes)
    expected_mean = x.mean(dim=(0, 2, 3, 4))
    expected_std = x.transpose(0, 1).reshape(2, -1).std(dim=1, unbiased=False)
    assert mean == [round(float(v), 4) for v in expected_mean] and std == [round(float(v), 4) for v in expected_std]
    normalised = normalize(volumes, mean, std)
    assert torch.allclose(normalised[:, 1], (x[:, 1].float() - mean[1]) / std[1], atol=1e-6)


def test_every_data_record_has_a_task_multiclass_by_default():
    split = Split(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 2]))
    data = Data("digits", ["zero", "one", "two"], 1, 2, [0.5], [0.25], split, split)  # as the paper's sets make it
    assert data.task == Task.multiclass(["zero", "one", "two"]) and data.spatial_dims == 2
    assert data.task.num_outputs == data.num_classes == 3 and data.assignment is None


def test_subset_of_multilabel_targets_is_a_plain_random_pick():
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.float32)
    split = Split(torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1), labels)
    part = subset(split, 3, seed=0)
    assert len(part) == 3 and part.labels.shape == (3, 2)
    assert torch.equal(labels[part.images.view(-1).long()], part.labels)
    data = Data("x", ["a", "b"], 1, 1, [0.5], [0.25], split, split, task=Task("multilabel", ("a", "b")))
    assert data.task.kind == "multilabel"
