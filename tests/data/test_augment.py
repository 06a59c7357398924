import pytest
import torch

from densenet.data.augment import TTA_VIEWS, alternate_flips, channel_stats, normalize, pad_crop_flip, tta_views


def test_pad_crop_flip_is_a_crop_of_the_padded_image_and_reproducible():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = pad_crop_flip(x, torch.Generator().manual_seed(3), padding=4)
    again = pad_crop_flip(x, torch.Generator().manual_seed(3), padding=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for i in range(16):
        crops = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        plain = any(torch.equal(out[i], crop) for crop in crops)
        mirrored = any(torch.equal(out[i], crop.flip(-1)) for crop in crops)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 16  # about half are flipped
    assert not torch.equal(out, x)


def test_normalize_and_channel_stats():
    x = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    x[:, 1] = 255
    mean, std = channel_stats(x)
    assert mean == [0.0, 1.0] and std[0] < 1e-3
    y = normalize(x, [0.5, 0.5], [0.5, 0.25])
    assert torch.allclose(y[:, 0], torch.full_like(y[:, 0], -1.0))
    assert torch.allclose(y[:, 1], torch.full_like(y[:, 1], 2.0))


def test_zero_crop_padding_only_flips():
    images = torch.randint(0, 255, (16, 3, 5, 5), dtype=torch.uint8)
    out = pad_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(mirrored.any()) and bool(same.any())


def test_given_flips_flip_exactly_those_images_and_alternate_flips_swap_every_epoch():
    images = torch.randint(0, 255, (6, 3, 5, 5), dtype=torch.uint8)
    flips = torch.tensor([True, False, False, True, True, False])
    out = pad_crop_flip(images, torch.Generator().manual_seed(0), padding=0, flips=flips)
    assert torch.equal(out[flips], images[flips].flip(-1)) and torch.equal(out[~flips], images[~flips])
    first = torch.tensor([True, False, True, False])
    index = torch.tensor([2, 1, 3])
    assert alternate_flips(first, index, 0).tolist() == [True, False, False]
    assert alternate_flips(first, index, 1).tolist() == [False, True, True]
    assert alternate_flips(first, index, 4).tolist() == [True, False, False]


def test_small_crops_are_windows_of_the_padded_image_at_the_same_scale():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = pad_crop_flip(x, torch.Generator().manual_seed(1), padding=1, size=5)
    assert out.shape == (32, 3, 5, 5) and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    corners = set()
    for i in range(32):
        found = [(r, c) for r in range(6) for c in range(6)
                 if torch.equal(out[i], padded[i, :, r:r + 5, c:c + 5])
                 or torch.equal(out[i], padded[i, :, r:r + 5, c:c + 5].flip(-1))]
        assert found
        corners.update(found)
    assert len(corners) > 10  # the window moves over all of the padded image
    assert torch.equal(pad_crop_flip(x, torch.Generator().manual_seed(0), padding=1),
                       pad_crop_flip(x, torch.Generator().manual_seed(0), padding=1, size=8))  # full size: as before
    with pytest.raises(ValueError, match="does not fit"):
        pad_crop_flip(x, torch.Generator(), size=9)


def test_flip_shift_views_are_the_normalised_windows_of_the_zero_padded_raw_image():
    # Oracle: shift the raw uint8 image inside its zero padding (as a training crop does), then normalise.
    x = torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    fill = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), mean, std).view(-1)
    views = tta_views(normalize(x, mean, std), "flip-shift", fill)
    assert views.shape == (3, TTA_VIEWS["flip-shift"], 3, 6, 6)
    padded, mirror = torch.nn.functional.pad(x, (1, 1, 1, 1)), torch.nn.functional.pad(x.flip(-1), (1, 1, 1, 1))
    expected = [x, x.flip(-1), padded[..., :6, :6], mirror[..., :6, :6], padded[..., 2:, 2:], mirror[..., 2:, 2:]]
    for v, raw in enumerate(expected):
        assert torch.allclose(views[:, v], normalize(raw, mean, std)), v
    assert tta_views(normalize(x, mean, std), "flip", fill).shape[1] == TTA_VIEWS["flip"] == 2
    assert torch.equal(tta_views(x, "none", fill)[:, 0], x)


def test_views_of_views_multiply():  # ten-crop inputs (N, 10, C, H, W): each crop gets every view
    crops = torch.randn(2, 10, 3, 5, 5)
    views = tta_views(crops, "flip-shift", torch.zeros(3))
    assert views.shape == (2, 60, 3, 5, 5)
    assert torch.equal(views[:, 10:20], crops.flip(-1)) and torch.equal(views[:, :10], crops)


def test_train_and_evaluate_offer_exactly_the_tta_modes_that_have_views():
    import argparse
    import typing

    from densenet.commands.evaluate import add_evaluate_arguments
    from densenet.training.options import TrainOptions

    assert typing.get_args(typing.get_type_hints(TrainOptions)["tta"]) == tuple(TTA_VIEWS)
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    assert next(a for a in parser._actions if a.dest == "tta").choices == list(TTA_VIEWS)
