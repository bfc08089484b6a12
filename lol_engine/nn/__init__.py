"""Learning-on-LoRA models: batching, GL-equivariant layers and the model registry."""

from lol_engine.nn.batch import LoraBatch, SpecMismatchError, check_compatible
from lol_engine.nn.models import MODELS, LoLModel, ModelConfig, build_model, registered_models

__all__ = [
    "MODELS",
    "LoLModel",
    "LoraBatch",
    "ModelConfig",
    "SpecMismatchError",
    "build_model",
    "check_compatible",
    "registered_models",
]
