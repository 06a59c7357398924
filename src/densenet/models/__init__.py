"""The models: ``DenseNet`` and its layers (densenet.py), the paper's configurations (registry.py), the dense
block's implementations (``block_impl``: plain in densenet.py, concat_free.py, efficient.py), loading others'
weights (compat.py, weights.py, pretrained.py).

Names are imported on first use, so that reading the registry (``densenet list``) does not load torch.
"""

import importlib

_NAMES = {"DenseBlock": "densenet", "DenseLayer": "densenet", "DenseNet": "densenet", "Transition": "densenet",
          "BLOCK_IMPLS": "densenet", "set_block_impl": "densenet",
          "create_model": "registry", "list_models": "registry", "model_config": "registry",
          "load_state_dict_compat": "compat", "remap_legacy_keys": "compat"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
