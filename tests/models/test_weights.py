"""Weight files: ours (safetensors + metadata), torchvision's and timm's, legacy keys, bad files."""

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import densenet
from densenet.errors import DenseNetError
from densenet.models.weights import infer_config, load_weights, read_metadata, read_state_dict, save_weights
from tests.helpers import write_malicious

META = {"model": "densenet_bc16_k4", "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "input_size": 8,
        "dataset": "digits"}


def tiny():
    return densenet.create_model("densenet_bc16_k4", num_classes=3, in_chans=1).eval()


def test_round_trip_with_metadata(tmp_path):
    model = tiny()
    save_weights(model, tmp_path / "model.safetensors", META)
    loaded, meta = load_weights(tmp_path)  # a run folder resolves to its model.safetensors
    assert meta["classes"] == ["a", "b", "c"] and meta["config"] == model.config
    assert read_metadata(tmp_path / "model.safetensors")["dataset"] == "digits"
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


@pytest.mark.slow
def test_torchvision_pth_and_timm_safetensors_load_as_they_are(tmp_path):
    reference = torchvision.models.densenet121().eval()
    legacy = {}
    for key, value in reference.state_dict().items():  # the published file still has 2017 key names
        for part in ("norm1", "conv1", "norm2", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    torch.save(legacy, tmp_path / "densenet121-a639ec97.pth")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "timm.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        for name in ("densenet121-a639ec97.pth", "timm.safetensors"):
            model, meta = load_weights(tmp_path / name)
            assert meta["model"] == "densenet121" and len(meta["classes"]) == 1000
            torch.testing.assert_close(model.eval()(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_infer_config_of_every_named_model():
    for name in densenet.list_models():
        with torch.device("meta"):
            model = densenet.create_model(name)
        config = infer_config(model.state_dict())
        assert {k: config[k] for k in ("growth_rate", "block_config", "num_init_features", "stem")} == {
            k: model.config[k] for k in ("growth_rate", "block_config", "num_init_features", "stem")}
        assert config["bottleneck_width"] == model.config["bottleneck_width"]


def test_checkpoint_file_gives_its_model(tmp_path):
    model = tiny()
    torch.save({"model": model.state_dict(), "model_config": model.config, "epoch": 1}, tmp_path / "ckpt.pt")
    assert torch.equal(read_state_dict(tmp_path / "ckpt.pt")["classifier.weight"], model.classifier.weight)
    loaded, _ = load_weights(tmp_path / "ckpt.pt")
    assert loaded.config == model.config


def test_bad_files(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pth", marker)
    with pytest.raises(DenseNetError, match="refusing to load"):
        load_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "text.safetensors").write_text("not weights")
    with pytest.raises(DenseNetError, match="not a readable safetensors"):
        load_weights(tmp_path / "text.safetensors")
    with pytest.raises(DenseNetError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")
    with open(tmp_path / "list.pth", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(DenseNetError):
        load_weights(tmp_path / "list.pth")


def test_other_architecture_or_class_count_is_a_clear_error(tmp_path):
    save_weights(tiny(), tmp_path / "m.safetensors", META)
    other = densenet.create_model("densenet_bc16_k4", num_classes=5, in_chans=1)
    from densenet.models.weights import load_into

    with pytest.raises(DenseNetError, match="does not fit this model.*shapes differ"):
        load_into(other, read_state_dict(tmp_path / "m.safetensors"), source="m.safetensors")
    with pytest.raises(DenseNetError, match="missing"):
        load_into(densenet.create_model("densenet_bc22_k4", num_classes=3, in_chans=1),
                  read_state_dict(tmp_path / "m.safetensors"), source="m.safetensors")
