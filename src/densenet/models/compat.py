"""Loading state dicts written by others: torchvision (current and 2017 key names), timm, DDP wrappers.

torchvision's 2017 checkpoints named the dense-layer modules ``norm.1``, ``relu.1``, ``conv.1``, ``norm.2``...
(a Sequential with dotted names); today's use ``norm1``, ``conv1``... The published ImageNet weights
still have the old names, which is why torchvision remaps them when it loads; so do we.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var"
                     r"|num_batches_tracked))$")
_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def remap_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename 2017 torchvision keys (``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``) and
    drop DDP/compile prefixes; other keys pass through unchanged."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPERS:
            while key.startswith(prefix):
                key = key[len(prefix):]
        match = _LEGACY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def load_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """``model.load_state_dict`` that also takes torchvision's 2017 keys and wrapped (DDP) checkpoints."""
    return model.load_state_dict(remap_legacy_keys(state_dict), strict=strict)
