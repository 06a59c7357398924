"""DenseNet: every network of Densely Connected Convolutional Networks (Huang et al., CVPR 2017).

    import densenet
    model = densenet.create_model("densenet_bc100_k12", num_classes=100)
    densenet.list_models()
"""

from densenet.errors import ConfigError, DenseNetError
from densenet.models import DenseNet, create_model, list_models, load_state_dict_compat

__all__ = ["ConfigError", "DenseNet", "DenseNetError", "create_model", "list_models", "load_state_dict_compat"]
__version__ = "0.1.0"
