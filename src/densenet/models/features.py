"""A DenseNet as a backbone, as timm's ``features_only=True`` makes it.

    backbone = densenet.create_model("densenet121", features_only=True, out_indices=(1, 2, 3), pretrained=True)
    maps = backbone(images)                      # a list: one map per selected stage
    backbone.feature_info.channels()             # [512, 1024, 1024]
    backbone.feature_info.reduction()            # [8, 16, 32]

A stage is a dense block (the DenseNet's ``feature_info`` entries): its output before the transition that
follows it, and for the last block the maps after the final BN-ReLU (what ``forward_intermediates`` gives).
Unlike timm's DenseNet, the stem is not a stage: ``out_indices`` counts dense blocks from 0, negative
indices count from the end. The module keeps the DenseNet's parameter names (``features.conv0.weight``...)
and drops the classifier and the blocks after the last selected one, so a DenseNet state dict (ours,
torchvision's) loads into it with ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from densenet.errors import ConfigError
from densenet.models.densenet import BlockImplSetting, DenseNet, tap_blocks


class FeatureInfo:
    """timm's FeatureInfo interface over the selected stages: ``channels()``, ``reduction()``, ``module_name()``."""

    def __init__(self, stages: list[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [dict(stage, index=i) for i, stage in enumerate(stages)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def get_dicts(self) -> list[dict[str, Any]]:
        return [dict(self.info[i]) for i in self.out_indices]

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


def resolve_out_indices(out_indices: Sequence[int] | None, stages: int) -> tuple[int, ...]:
    """Sorted, non-negative, unique stage indices; a ConfigError naming the valid range otherwise."""
    if out_indices is None:
        return tuple(range(stages))
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    resolved = []
    for i in out_indices:
        if not isinstance(i, int) or not -stages <= i < stages:
            raise ConfigError(f"out_indices {tuple(out_indices)}: this model has {stages} stages (dense blocks), "
                              f"so each index is in 0..{stages - 1} (or -{stages}..-1)")
        resolved.append(i % stages)
    if not resolved:
        raise ConfigError("out_indices is empty; select at least one stage")
    return tuple(sorted(set(resolved)))


class DenseNetFeatures(BlockImplSetting, nn.Module):
    """The stem and dense blocks of a DenseNet up to the last selected stage; forward gives a list of maps."""

    def __init__(self, model: DenseNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        stages = len(model.block_config)
        self.out_indices = resolve_out_indices(out_indices, stages)
        last = self.out_indices[-1]
        keep = nn.Sequential()
        for name, module in model.features.named_children():
            if name == "norm5" and last != stages - 1:
                break
            if name == f"transition{last + 1}":
                break
            keep.add_module(name, module)
        self.features = keep  # the same modules (and parameters) as the model's, so its weights stay in place
        self.num_stages = stages
        self.feature_info = FeatureInfo([dict(info) for info in model.feature_info], self.out_indices)
        self.config = dict(model.config)
        if hasattr(model, "pretrained_cfg"):
            self.pretrained_cfg = model.pretrained_cfg

    def forward(self, x: Tensor) -> list[Tensor]:
        return tap_blocks(self.features, x, self.out_indices, self.num_stages)

    def extra_repr(self) -> str:
        return f"out_indices={self.out_indices}, block_impl={self.block_impl!r}"
