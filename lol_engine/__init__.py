"""lol-explorer's engine: safe LoRA readers, GL(r)-symmetry tools and Learning-on-LoRAs models.

``import lol_engine`` stays light: it never imports gradio, duckdb or umap.
"""

from lol_engine.errors import BadRequestError, LolError, LoraFormatError, NotFoundError, StoreError
from lol_engine.estimate import Estimate
from lol_engine.glossary import Glossary, LabelDescription
from lol_engine.lora import (
    LoraMetadata,
    LoraModule,
    LoraSummary,
    LoraWeights,
    PeftAdapterConfig,
    ReadLimits,
    inspect_lora,
    load_lora,
)
from lol_engine.spec import LayerSpec, LoraSpec

__version__ = "0.1.0"

__all__ = [
    "BadRequestError",
    "Estimate",
    "Glossary",
    "LabelDescription",
    "LayerSpec",
    "LolError",
    "LoraFormatError",
    "LoraMetadata",
    "LoraModule",
    "LoraSpec",
    "LoraSummary",
    "LoraWeights",
    "NotFoundError",
    "PeftAdapterConfig",
    "ReadLimits",
    "StoreError",
    "__version__",
    "inspect_lora",
    "load_lora",
]
