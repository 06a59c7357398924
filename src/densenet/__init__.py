"""DenseNet: every network of Densely Connected Convolutional Networks (Huang et al., CVPR 2017).

    import densenet
    model = densenet.create_model("densenet_bc100_k12", num_classes=100)
    densenet.list_models()

The models are imported on first use (``densenet.create_model`` loads torch; ``import densenet`` does not),
so that the command line answers ``densenet --help`` at once.
"""

from densenet.errors import ConfigError, DenseNetError

__all__ = ["ConfigError", "DenseNet", "DenseNetError", "create_model", "list_models", "load_state_dict_compat"]
__version__ = "0.1.0"  # the same as pyproject.toml's (a test checks)


def __getattr__(name: str):
    if name in ("DenseNet", "create_model", "list_models", "load_state_dict_compat"):
        import densenet.models

        return getattr(densenet.models, name)
    raise AttributeError(f"module 'densenet' has no attribute {name!r}")
