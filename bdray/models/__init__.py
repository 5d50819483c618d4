from bdray.models import cnn, resnet, tv  # noqa: F401  (registers the builders)
from bdray.models.io import UnsafeCheckpointError, load_state_dict, load_weights, save_weights
from bdray.models.registry import MODELS, Classifier, ModelSpec, get_model, list_models, register_model

__all__ = [
    "MODELS",
    "Classifier",
    "ModelSpec",
    "UnsafeCheckpointError",
    "get_model",
    "list_models",
    "load_state_dict",
    "load_weights",
    "register_model",
    "save_weights",
]
