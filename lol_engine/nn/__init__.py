"""Learning-on-LoRA models: batching, GL-equivariant layers and the model registry."""

from lol_engine.nn.batch import LoraBatch, ModuleSetBatch, SpecMismatchError, check_compatible
from lol_engine.nn.models import MODELS, LoLModel, ModelConfig, build_model, registered_models
from lol_engine.nn.module_tokens import ModuleTokenNet, module_identity

__all__ = [
    "MODELS",
    "LoLModel",
    "LoraBatch",
    "ModelConfig",
    "ModuleSetBatch",
    "ModuleTokenNet",
    "SpecMismatchError",
    "build_model",
    "check_compatible",
    "module_identity",
    "registered_models",
]
