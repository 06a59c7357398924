"""Backbones as timm makes them: create_model(name, features_only=True, out_indices=...)."""

from __future__ import annotations

import pytest
import torch

import densenet
from densenet.errors import ConfigError
from densenet.models.features import DenseNetFeatures

TINY = dict(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8)


def test_one_map_per_selected_stage_with_timm_feature_info():
    model = densenet.create_model("densenet121", **TINY).eval()
    backbone = densenet.create_model("densenet121", features_only=True, out_indices=(1, -1), **TINY).eval()
    backbone.load_state_dict(model.state_dict(), strict=False)
    assert isinstance(backbone, DenseNetFeatures)
    assert backbone.feature_info.channels() == [model.feature_info[1]["num_chs"], model.feature_info[3]["num_chs"]]
    assert backbone.feature_info.reduction() == [8, 32]
    assert backbone.feature_info.module_name() == ["features.denseblock2", "features.norm5"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x)
        reference = model.forward_intermediates(x)
    assert len(maps) == 2
    for got, want, c, r in zip(maps, (reference[1], reference[3]), backbone.feature_info.channels(),
                               backbone.feature_info.reduction(), strict=True):
        assert got.shape == (2, c, 64 // r, 64 // r)
        assert torch.equal(got, want)


def test_default_is_every_block_and_later_blocks_are_dropped():
    full = densenet.create_model("densenet_bc16_k4", features_only=True)
    assert full.feature_info.channels() == [info["num_chs"] for info in full.feature_info.get_dicts()]
    assert len(full(torch.randn(1, 3, 32, 32))) == 3
    first = densenet.create_model("densenet_bc16_k4", features_only=True, out_indices=(0,))
    names = [name for name, _ in first.named_children()] + list(dict(first.features.named_children()))
    assert "transition1" not in names and "norm5" not in names and "classifier" not in names
    (out,) = first(torch.randn(1, 3, 32, 32))
    assert out.shape[1] == first.feature_info.channels()[0]
    # its parameters are a subset of the classifier model's, under the same names
    model_keys = set(densenet.create_model("densenet_bc16_k4").state_dict())
    assert set(first.state_dict()) < model_keys


def test_bad_out_indices_say_the_range():
    with pytest.raises(ConfigError, match=r"4 stages .* 0\.\.3"):
        densenet.create_model("densenet121", features_only=True, out_indices=(4,), **TINY)
    with pytest.raises(ConfigError, match="features_only=True"):
        densenet.create_model("densenet121", out_indices=(1,), **TINY)


def test_pretrained_weights_load_into_the_backbone(monkeypatch, tmp_path):
    from tests.helpers import cache_tiny_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    state = cache_tiny_weights(monkeypatch, tmp_path)
    backbone = densenet.create_model("densenet121", pretrained=True, features_only=True, out_indices=(2, 3))
    own = backbone.state_dict()
    assert own and all(torch.equal(v, state[k]) for k, v in own.items())
    assert backbone.pretrained_cfg["input_size"] == 224
