from densenet.models.compat import load_state_dict_compat, remap_legacy_keys
from densenet.models.densenet import DenseBlock, DenseLayer, DenseNet, Transition
from densenet.models.registry import create_model, list_models, model_config

__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "Transition", "create_model", "list_models", "model_config",
           "load_state_dict_compat", "remap_legacy_keys"]
