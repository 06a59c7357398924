"""Pretrained by name: torchvision's weights API, torch.hub's cache under TORCH_HOME, the hash in the file name.

No network here: the cached path is tested with a file placed in a temporary TORCH_HOME. Its weights entry is
a real torchvision WeightsEnum whose URL ends in the SHA-256 prefix of that file (as torchvision's URLs do),
and a tiny ImageNet-form architecture stands in for densenet121 so the tests take seconds.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch
from PIL import Image
from torchvision.models import DenseNet121_Weights

import densenet
from densenet.cli import main
from densenet.errors import DenseNetError
from densenet.models import pretrained
from tests.helpers import cache_tiny_weights, make_image_folder, place_weights_file


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return home


def _no_network(url, dst, *args, **kwargs):
    print(f'Downloading: "{url}" to {dst}')  # as torch.hub does, on stdout
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_cache_path_is_torchvisions(torch_home):
    weights = pretrained.torchvision_weights("densenet121")
    assert weights is DenseNet121_Weights.IMAGENET1K_V1
    assert pretrained.cache_path(weights) == torch_home / "hub" / "checkpoints" / "densenet121-a639ec97.pth"


def test_cached_file_loads_with_metadata(monkeypatch, torch_home):
    state = cache_tiny_weights(monkeypatch, torch_home)
    model = densenet.create_model("densenet121", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    cfg = model.pretrained_cfg
    assert cfg["classes"][:2] == ["tench", "goldfish"] and len(cfg["classes"]) == 1000
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    assert cfg["input_size"] == 224 and cfg["dataset"] == "imagenet"


def test_other_class_count_keeps_all_but_the_classifier(monkeypatch, torch_home):
    state = cache_tiny_weights(monkeypatch, torch_home)
    model = densenet.create_model("densenet121", pretrained=True, num_classes=7)
    own = model.state_dict()
    assert own["classifier.weight"].shape == (7, state["classifier.weight"].shape[1])
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("classifier."))
    assert "classes" not in model.pretrained_cfg


def test_cached_file_with_wrong_hash_is_refused(monkeypatch, torch_home):
    cache_tiny_weights(monkeypatch, torch_home, corrupt=True)
    with pytest.raises(DenseNetError, match=r"densenet121-[0-9a-f]{8}\.pth does not match the hash in its name"):
        densenet.create_model("densenet121", pretrained=True)


def test_offline_and_not_cached_names_url_and_cache_path(monkeypatch, torch_home, capsys):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(DenseNetError) as info:
        densenet.create_model("densenet121", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/densenet121-a639ec97.pth" in message
    assert str(torch_home / "hub" / "checkpoints" / "densenet121-a639ec97.pth") in message
    # the command line: one line, exit 2, no traceback
    image = torch_home.parent / "photo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    assert main(["predict", "densenet121", str(image)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing but results on stdout (predict --json)
    errors = [line for line in err.splitlines() if line.startswith("densenet predict: error: ")]
    assert len(errors) == 1 and "densenet121-a639ec97.pth" in errors[0] and "Traceback" not in err


def test_no_published_weights():
    with pytest.raises(DenseNetError, match="no published ImageNet weights for 'densenet264'"):
        densenet.create_model("densenet264", pretrained=True)


@pytest.mark.slow
def test_cli_takes_a_model_name(monkeypatch, torch_home, tmp_path, capsys):
    state = cache_tiny_weights(monkeypatch, torch_home)
    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (10, 200, 10)).save(image)
    assert main(["predict", "densenet121", str(image), "--top-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 3  # two ImageNet class names with probabilities
    # export: ONNX with the ImageNet metadata
    out = tmp_path / "d121.onnx"
    assert main(["export", "densenet121", "--out", str(out)]) == 0
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"tench"' in props["classes"] and props["input_size"] == "224"
    # train --init NAME reads the same state dict
    from densenet.models.weights import read_state_dict

    assert all(torch.equal(read_state_dict("densenet121")[k], v) for k, v in state.items())
    # evaluate resolves the name too (then checks the classes against the data set)
    from densenet.training.evaluate import evaluate_weights

    for cls in ("a", "b"):
        (tmp_path / "data" / "test" / cls).mkdir(parents=True)
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "test" / cls / "x.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / cls / "x.png")
    with pytest.raises(DenseNetError, match="densenet121 predicts 1000 classes but folder has 2"):
        evaluate_weights("densenet121", "folder", str(tmp_path / "data"), workers=0, device="cpu")


def test_a_file_named_like_a_model_is_still_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "densenet121").write_bytes(b"not weights")
    from densenet.models.weights import load_weights

    with pytest.raises(DenseNetError, match="(refusing to load|is not a readable).*densenet121|densenet121 (is not|:)"):
        load_weights("densenet121")


def test_a_model_name_without_published_weights_says_which_have_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from densenet.models.weights import load_weights

    with pytest.raises(DenseNetError, match="densenet264 has no published ImageNet weights.*densenet121"):
        load_weights("densenet264")


def test_train_init_by_name_fine_tunes_from_the_pretrained_weights(monkeypatch, torch_home, tmp_path, capsys):
    from types import SimpleNamespace

    from densenet.training.options import resolve_options
    from densenet.training.train import _build_model

    state = cache_tiny_weights(monkeypatch, torch_home)
    options = resolve_options(None, {"dataset": "folder", "init": "densenet121", "data_dir": str(tmp_path)})
    assert options.model == "densenet121"  # the folder data set's default model
    from densenet.data.task import Task

    data = SimpleNamespace(num_classes=2, in_chans=3, task=Task.multiclass(["a", "b"]), spatial_dims=2, name="folder")
    model = _build_model(options, data)
    own = model.state_dict()
    assert own["classifier.weight"].shape[0] == 2
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("classifier."))
    data = make_image_folder(tmp_path / "data", per_class=2, size=40)
    code = main(["train", "--init", "densenet121", "--dataset", "folder", "--data-dir", str(data), "--epochs", "1",
                 "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchvisions_file_format_gives_torchvisions_outputs(monkeypatch, torch_home):
    """The published file's 2017 key names (norm.1, conv.2...) at full size: the same logits as torchvision's."""
    import torchvision

    reference = torchvision.models.densenet121().eval()
    legacy = {}
    for key, value in reference.state_dict().items():
        for part in ("norm1", "conv1", "norm2", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    cache_tiny_weights(monkeypatch, torch_home, state=legacy)
    from densenet.models.weights import load_weights

    model, metadata = load_weights("densenet121")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-4, atol=1e-5)
    assert metadata["model"] == "densenet121" and metadata["config"]["num_classes"] == 1000


def test_other_input_channels_adapt_the_first_convolution(monkeypatch, torch_home):
    state = cache_tiny_weights(monkeypatch, torch_home)
    rgb = state["features.conv0.weight"]
    gray = densenet.create_model("densenet121", pretrained=True, in_chans=1)
    torch.testing.assert_close(gray.state_dict()["features.conv0.weight"], rgb.sum(dim=1, keepdim=True))
    assert gray.pretrained_cfg["mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]
    # a gray image through the adapted filter = the same image as RGB through the original ones (before the stem BN)
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(gray.features.conv0(x), torch.nn.functional.conv2d(x.expand(1, 3, 16, 16), rgb,
                                                                                    stride=2, padding=3))
    five = densenet.create_model("densenet121", pretrained=True, in_chans=5)
    assert five.state_dict()["features.conv0.weight"].shape[1] == 5 and len(five.pretrained_cfg["std"]) == 5
    assert all(torch.equal(gray.state_dict()[k], v) for k, v in state.items() if k != "features.conv0.weight")


def test_a_cached_file_that_would_run_code_is_refused(monkeypatch, torch_home, capfd):
    """Only 8 hex digits of SHA-256 are in the name: a forged file can match them; unpickling stays weights-only."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    place_weights_file(monkeypatch, torch_home, pickle.dumps({"features.conv0.weight": Evil()}, protocol=2))
    with pytest.raises(DenseNetError, match="refusing to load .*densenet121-[0-9a-f]{8}.pth"):
        pretrained.pretrained_state_dict("densenet121")
    assert "this ran" not in capfd.readouterr().out
