"""Heat maps: CAM is the exact decomposition of the logit, Grad-CAM agrees with the ``grad-cam`` package, the label
follows the task, 3D volumes keep their axes, and the overlays and contact sheet are written."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from densenet.analysis.explain import (
    class_activation_maps,
    explain,
    explain_batch,
    grad_cams,
    resolve_layer,
    slice_indices,
    task_from_metadata,
    upsample,
)
from densenet.data.task import Task
from densenet.errors import ConfigError, DenseNetError
from densenet.models.densenet import DenseNet


def tiny_densenet(num_classes: int = 3, in_chans: int = 1) -> DenseNet:
    """Two blocks (12x12 then 6x6 maps on a 12x12 input), in float64, with BN statistics far from identity."""
    model = DenseNet(growth_rate=4, block_config=(2, 2), bottleneck_width=2, stem="cifar", in_chans=in_chans,
                     num_classes=num_classes).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            elif isinstance(module, nn.Linear):
                module.bias.uniform_(-1.0, 1.0)
    return model


class Tiny3d(nn.Module):
    """A 3D classifier with the DenseNet interface: forward_features, forward_head (global average pooling +
    linear), get_classifier, feature_info. Stage 0 at the input's resolution, stage 1 at 1/stride."""

    def __init__(self, in_chans: int = 1, width: int = 4, num_classes: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            conv0=nn.Conv3d(in_chans, width, 3, padding=1), norm0=nn.BatchNorm3d(width), relu0=nn.ReLU(),
            conv1=nn.Conv3d(width, width, 3, stride=stride, padding=1), norm1=nn.BatchNorm3d(width)))
        self.classifier = nn.Linear(width, num_classes)
        self.feature_info = [dict(num_chs=width, reduction=1, module="features.relu0"),
                             dict(num_chs=width, reduction=stride, module="features.norm1")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool3d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier


class Tapped(nn.Module):
    """The model with an identity module on forward_features' output, for the package's forward hooks: hooking
    ``norm5`` itself would record the final BN's output before the ReLU (in place in DenseNet) changes it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.tap(self.model.forward_features(x)))


def package_grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, indices: list[int]) -> np.ndarray:
    """The package's maps: (map - min) / (1e-7 + max - min), at input size; the caller makes the maps large
    (classifier weights x 1000) so that its 1e-7 is negligible."""
    from pytorch_grad_cam import GradCAM  # the `grad-cam` package, the oracle
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(images, [ClassifierOutputTarget(i) for i in indices])


def minmax(maps: torch.Tensor) -> np.ndarray:
    """Each map rescaled to [0, 1] as the package hands them back (an all-zero map stays zero)."""
    flat = maps.flatten(1).double()
    low, high = flat.min(1).values, flat.max(1).values
    return ((flat - low[:, None]) / (high - low + 1e-7)[:, None]).view_as(maps).float().numpy()


# ---------------------------------------------------------------------------------------------------- CAM


@pytest.mark.parametrize("label", [None, "1"])
def test_cam_mean_plus_bias_is_the_logit(label):
    model = tiny_densenet()
    images = torch.randn(4, 1, 12, 12, dtype=torch.float64)
    maps, targets, probabilities = class_activation_maps(model, images, task_from_metadata({}, 3), label)
    logits = model(images)
    assert maps.shape == (4, 6, 6)
    index = [t.index for t in targets]
    assert index == (logits.argmax(1).tolist() if label is None else [1] * 4)
    expected = logits[torch.arange(4), index]
    torch.testing.assert_close(maps.flatten(1).mean(1) + model.classifier.bias[index], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(probabilities, torch.softmax(logits, 1).float())
    # by hand, for a label that is not the predicted one
    features = model.forward_features(images)
    by_hand = (model.classifier.weight[2][None, :, None, None] * features).sum(1)
    maps2, _, _ = class_activation_maps(model, images, task_from_metadata({}, 3), "2")
    torch.testing.assert_close(maps2, by_hand, rtol=0, atol=1e-12)


def test_cam_refuses_a_head_that_is_not_global_average_pooling_and_linear():
    model = tiny_densenet()
    model.forward_head = lambda x, pre_logits=False: model.classifier(F.adaptive_max_pool2d(x, 1).flatten(1))
    with pytest.raises(ConfigError, match="global-average-pooling"):
        class_activation_maps(model, torch.randn(2, 1, 12, 12, dtype=torch.float64), task_from_metadata({}, 3))
    other = tiny_densenet()
    other.classifier = nn.Sequential(nn.Linear(other.num_features, 3))
    with pytest.raises(ConfigError, match="linear classifier"):
        explain_batch(other, torch.randn(2, 1, 12, 12, dtype=torch.float64))


def test_cam_of_a_layer_other_than_the_last_is_refused():
    with pytest.raises(ConfigError, match="gradcam"):
        explain_batch(tiny_densenet(), torch.randn(1, 1, 12, 12), layer="denseblock1")


# ---------------------------------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_at_the_last_stage_is_relu_of_cam():
    model = tiny_densenet()
    images = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    task = task_from_metadata({}, 3)
    cam, cam_targets, _ = class_activation_maps(model, images, task, "0")
    grad, grad_targets, _ = grad_cams(model, images, task, None, "0")
    assert cam_targets == grad_targets
    torch.testing.assert_close(grad * 36, F.relu(cam), rtol=0, atol=1e-12)  # alpha_c = w_c / HW


@pytest.mark.parametrize("layer", ["denseblock1", "features.norm5"])
def test_grad_cam_matches_the_grad_cam_package_2d(layer):
    model = tiny_densenet().float()
    with torch.no_grad():
        model.classifier.weight *= 1000
    images = torch.randn(3, 1, 12, 12)
    task = task_from_metadata({}, 3)
    maps, targets, _ = grad_cams(model, images, task, layer)
    indices = [t.index for t in targets]
    assert indices == model(images).argmax(1).tolist()
    ours = minmax(upsample(maps, (12, 12)))
    if layer == "denseblock1":  # 12x12 maps, hooked on the block itself
        reference = package_grad_cam(model, model.features.denseblock1, images, indices)
    else:  # 6x6 maps after the final BN-ReLU, resized by OpenCV there and by torch here
        tapped = Tapped(model)
        reference = package_grad_cam(tapped, tapped.tap, images, indices)
    assert maps.shape[1:] == ((12, 12) if layer == "denseblock1" else (6, 6))
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_memory_efficient_blocks_give_the_same_maps():
    """The memory-efficient block runs its own autograd code: its Grad-CAM must be the standard block's."""
    model = tiny_densenet()
    efficient = DenseNet(**{**model.config, "block_config": tuple(model.config["block_config"])},
                         memory_efficient=True).double().eval()
    efficient.load_state_dict(model.state_dict())
    images = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    task = task_from_metadata({}, 3)
    for layer in ("denseblock1", None):
        torch.testing.assert_close(grad_cams(efficient, images, task, layer)[0],
                                   grad_cams(model, images, task, layer)[0])
    torch.testing.assert_close(class_activation_maps(efficient, images, task)[0],
                               class_activation_maps(model, images, task)[0])


def test_layers_are_named_by_feature_info():
    model = tiny_densenet()
    assert resolve_layer(model, None) == "features.norm5"
    assert resolve_layer(model, "denseblock1") == "features.denseblock1"
    assert resolve_layer(model, "0") == "features.denseblock1"
    assert resolve_layer(model, "-1") == "features.norm5"
    assert resolve_layer(model, "denseblock2") == "features.norm5"  # the last block's maps, after its BN-ReLU
    with pytest.raises(ConfigError, match=r"denseblock1, denseblock2 \(= norm5\)"):
        resolve_layer(model, "transition1")


# ---------------------------------------------------------------------------------------------------- tasks


def test_binary_one_logit_explains_the_positive_logit_and_negates_for_the_negative_name():
    model = tiny_densenet(num_classes=1)
    images = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    task = task_from_metadata({"classes": ["normal", "pneumonia"]}, 1)
    assert task == Task("binary", ("normal", "pneumonia"))
    positive, targets, probabilities = class_activation_maps(model, images, task)
    logit = model(images)[:, 0]
    assert [t.name for t in targets] == ["pneumonia"] * 3
    np.testing.assert_allclose([t.probability for t in targets], torch.sigmoid(logit).tolist(), rtol=1e-6)
    torch.testing.assert_close(positive.flatten(1).mean(1) + model.classifier.bias, logit, rtol=0, atol=1e-12)
    negative, targets, _ = class_activation_maps(model, images, task, "normal")
    torch.testing.assert_close(negative, -positive)
    np.testing.assert_allclose([t.probability for t in targets], (1 - torch.sigmoid(logit)).tolist(), rtol=1e-6)
    gradient, _, _ = grad_cams(model, images, task, "denseblock1", "normal")  # the negated target, as the
    assert gradient.shape == (3, 12, 12)  # package's BinaryClassifierOutputTarget(0)


def test_multi_label_explains_a_named_label_with_its_sigmoid():
    model = tiny_densenet(num_classes=3)
    images = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    metadata = {"classes": ["sea", "sunset", "trees"], "task": {"kind": "multilabel", "names": ["sea", "sunset",
                                                                                                  "trees"]}}
    out = explain_batch(model, images, metadata, label="trees", true_labels=["trees", None])
    sigmoid = torch.sigmoid(model(images)).float()
    assert [e.label for e in out] == ["trees", "trees"]
    np.testing.assert_allclose([e.probability for e in out], sigmoid[:, 2].tolist(), rtol=1e-6)
    assert [e.predicted for e in out] == [["sea", "sunset", "trees"][i] for i in sigmoid.argmax(1).tolist()]
    assert out[1].correct is None and out[0].correct == (out[0].predicted == "trees")
    out[1].true_label = "sunset|trees"  # several true labels: right when the prediction is one of them
    assert out[1].correct == (out[1].predicted in ("sunset", "trees"))
    assert out[0].scores.shape == (12, 12) and out[0].pixels.shape == (1, 12, 12)
    with pytest.raises(DenseNetError, match="not one of this model's labels: sea, sunset, trees"):
        explain_batch(model, images, metadata, label="cat")


def test_task_comes_from_metadata_or_from_the_outputs():
    assert task_from_metadata({}, 1) == Task("binary", ("0", "1"))
    assert task_from_metadata({"classes": ["pneumonia"]}, 1) == Task("binary", ("not pneumonia", "pneumonia"))
    assert task_from_metadata({}, 3) == Task.multiclass(["0", "1", "2"])
    recorded = Task("multilabel", ("a", "b"))
    assert task_from_metadata({"task": recorded.to_dict(), "classes": ["x", "y"]}, 2) == recorded
    with pytest.raises(DenseNetError, match="multilabel task with 2 output"):
        task_from_metadata({"task": recorded.to_dict()}, 3)
    with pytest.raises(ConfigError):
        task_from_metadata({"classes": ["a", "b", "c"]}, 1)  # a binary task has two names


# ---------------------------------------------------------------------------------------------------- 3D


def test_3d_cam_is_exact_and_keeps_the_axes():
    torch.manual_seed(1)
    model = Tiny3d().double().eval()
    volumes = torch.randn(2, 1, 8, 6, 10, dtype=torch.float64)
    maps, targets, _ = class_activation_maps(model, volumes, task_from_metadata({}, 3))
    assert maps.shape == (2, 4, 3, 5)
    index = [t.index for t in targets]
    torch.testing.assert_close(maps.flatten(1).mean(1) + model.classifier.bias[index],
                               model(volumes)[torch.arange(2), index], rtol=0, atol=1e-12)
    # A model that passes the input through (centre taps 1, BN the identity) and a bright voxel at (2, 4, 6):
    # stride 2 keeps it at (1, 2, 3), and the volume upsampled to the input peaks back on (2|3, 4|5, 6|7).
    with torch.no_grad():
        for conv in (model.features.conv0, model.features.conv1):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1, 1] = 1.0
        for norm in (model.features.norm0, model.features.norm1):
            norm.reset_parameters()
            norm.eps = 1e-300  # positive (torch 2.11 refuses 0 even in eval), and 1 + eps == 1 in float64
        model.classifier.weight.zero_()
        model.classifier.weight[0, 0] = 1.0
    volume = torch.zeros(1, 1, 8, 10, 12, dtype=torch.float64)
    volume[0, 0, 2, 4, 6] = 5.0
    (e,) = explain_batch(model, volume, label="0")
    assert e.scores.shape == (8, 10, 12)
    peak = np.unravel_index(int(e.scores.argmax()), e.scores.shape)
    assert tuple(int(p) // 2 for p in peak) == (1, 2, 3)
    assert e.scores.max() == pytest.approx(5.0 * (0.75 ** 3))  # trilinear: 3/4 of the voxel on each axis


def test_3d_grad_cam_matches_the_grad_cam_package():
    torch.manual_seed(2)
    model = Tiny3d(stride=1).eval()
    with torch.no_grad():
        model.classifier.weight *= 1000
    volumes = torch.randn(2, 1, 5, 6, 7)
    task = task_from_metadata({}, 3)
    for layer, hooked in (("relu0", None), (None, "tap")):
        maps, targets, _ = grad_cams(model, volumes, task, layer)
        tapped = Tapped(model)
        target_layer = tapped.tap if hooked else model.features.relu0
        reference = package_grad_cam(tapped, target_layer, volumes, [t.index for t in targets])
        assert maps.shape == (2, 5, 6, 7)  # stride 1: the package's spline zoom is the identity
        np.testing.assert_allclose(minmax(maps), reference, atol=2e-5)


def test_slices_to_draw():
    assert slice_indices(5) == [0, 1, 2, 3, 4]
    assert slice_indices(64, 16)[0] == 0 and slice_indices(64, 16)[-1] == 63 and len(slice_indices(64, 16)) == 16


# ---------------------------------------------------------------------------------------------------- files


def test_explain_writes_an_overlay_per_image_and_a_contact_sheet(tmp_path):
    model = tiny_densenet(num_classes=2, in_chans=3).float()
    images = torch.randn(3, 3, 12, 12)
    metadata = {"classes": ["cat", "dog"], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    paths = explain(model, images, tmp_path / "out", metadata, method="gradcam", layer="denseblock1",
                    names=["a/x.png", "b/x.png", "y.jpg"], true_labels=["cat", "dog", None], sheet=True,
                    batch_size=2)
    assert [p.name for p in paths] == ["x.gradcam.png", "x-2.gradcam.png", "y.gradcam.png", "sheet.gradcam.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temporaries


@pytest.mark.slow
def test_explain_draws_a_volume_as_slices(tmp_path):
    model = Tiny3d(in_chans=1).eval()
    volumes = torch.rand(2, 1, 4, 6, 6)
    paths = explain(model, volumes, tmp_path, {"classes": ["a", "b", "c"]}, names=["v1.npy", "v2.npy"], sheet=True)
    assert [p.name for p in paths] == ["v1.cam.png", "v2.cam.png", "sheet.cam.png"]
    with Image.open(paths[0]) as grid, Image.open(paths[2]) as sheet:
        assert grid.size[0] >= 2 * 1.8 * 100 - 1  # 4 slices: a 2 x 2 grid of 1.8-inch tiles at 100 dpi
        assert sheet.size[0] >= 2 * 2.4 * 100 - 1


# ---------------------------------------------------------------------------------------------------- command


def saved_run(folder):
    """A run folder holding a digits-sized DenseNet-BC (untrained: the maps' values do not matter here) and the
    metadata training writes, so the command reads weights and images exactly as predict does."""
    from densenet.models.registry import create_model
    from densenet.models.weights import save_weights

    model = create_model("densenet_bc16_k4", num_classes=10, in_chans=1).eval()
    folder.mkdir(parents=True)
    save_weights(model, folder / "model.safetensors", {"model": "densenet_bc16_k4", "classes": [str(d) for d in range(
        10)], "mean": [0.3], "std": [0.4], "input_size": 8, "dataset": "digits"})
    return folder


def digit_files(folder, count: int = 3) -> list:
    """Small grayscale PNGs in FOLDER/LABEL/digitI-LABEL.png (label I), as a user would hand them to the command."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / str(i) / f"digit{i}-{i}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths[-1])
    return paths


def test_explain_command_on_a_run_folder(tmp_path, capsys):
    from tests.helpers import run_cli

    saved_run(tmp_path / "run")
    files = digit_files(tmp_path / "images", count=2)
    code, out, err = run_cli(capsys, "explain", tmp_path / "run", *files, "--out", tmp_path / "cam", "--sheet",
                             "--truth-from-folder")
    assert code == 0, err
    written = [tmp_path / "cam" / f"digit{i}-{i}.cam.png" for i in range(2)]
    assert out.split() == [str(p) for p in written + [tmp_path / "cam" / "sheet.cam.png"]]
    assert "CAM of the predicted label for 2 image(s)" in err
    code, out, err = run_cli(capsys, "explain", tmp_path / "run", tmp_path / "images", "--out", tmp_path / "grad",
                             "--method", "gradcam", "--layer", "denseblock2", "--label", "7")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "grad").iterdir()) == [f"digit{i}-{i}.gradcam.png" for i in range(2)]
    with Image.open(tmp_path / "grad" / "digit0-0.gradcam.png") as png:
        assert png.format == "PNG"


def test_explain_command_user_errors_write_nothing(tmp_path, capsys):
    from tests.helpers import assert_user_error, run_cli

    saved_run(tmp_path / "run")
    files = digit_files(tmp_path / "images", count=1)
    (tmp_path / "images" / "0").rename(tmp_path / "images" / "zero")
    files = [tmp_path / "images" / "zero" / files[0].name]
    for extra, needle in ((["--label", "cat"], "label 'cat' is not one of this model's labels: 0, 1"),
                          (["--truth-from-folder"], "folder 'zero', which is not one of this model's labels"),
                          (["--method", "gradcam", "--layer", "transition1"],
                           "this model's stages are denseblock1, denseblock2, denseblock3 (= norm5)"),
                          (["--layer", "denseblock1"], "use --method gradcam")):
        code, _, err = run_cli(capsys, "explain", tmp_path / "run", *files, "--out", tmp_path / "out", *extra)
        assert_user_error(code, err, "explain", needle)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_binary_prediction_is_decided_at_the_runs_threshold_as_predict_decides_it():
    """The weights' metadata carries the threshold chosen on validation; explain's verdict uses it, not 0.5."""
    model = tiny_densenet(num_classes=1)
    images = torch.randn(4, 1, 12, 12, dtype=torch.float64)
    task = {"task": {"kind": "binary", "names": ["normal", "mass"]}}
    with torch.no_grad():
        p = torch.sigmoid(model.eval()(images)[:, 0])
    never, always = explain_batch(model, images, task | {"thresholds": [1.0]}), \
        explain_batch(model, images, task | {"thresholds": [0.0]})
    assert [e.predicted for e in never] == ["normal"] * 4 and [e.predicted for e in always] == ["mass"] * 4
    np.testing.assert_allclose([e.predicted_probability for e in never], (1 - p).tolist(), rtol=1e-6)
    middle = float(p.sort().values[1:3].mean())  # between two of the four probabilities
    decided = explain_batch(model, images, task | {"thresholds": [middle]})
    assert [e.predicted for e in decided] == ["mass" if float(q) > middle else "normal" for q in p]
