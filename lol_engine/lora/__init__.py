"""Reading LoRA files of every common format into one canonical form. See :mod:`lol_engine.lora._conventions`."""

from lol_engine.errors import LoraFormatError
from lol_engine.lora.config import AdapterConfig, MlxAdapterConfig, PeftAdapterConfig, read_adapter_config
from lol_engine.lora.locate import LoraLocation, display_name, find_loras, locate_lora
from lol_engine.lora.parse import LoraSummary, inspect_lora, load_lora
from lol_engine.lora.safe_io import ReadLimits, read_header
from lol_engine.lora.weights import LoraMetadata, LoraModule, LoraWeights

__all__ = [
    "AdapterConfig",
    "LoraFormatError",
    "LoraLocation",
    "LoraMetadata",
    "LoraModule",
    "LoraSummary",
    "LoraWeights",
    "MlxAdapterConfig",
    "PeftAdapterConfig",
    "ReadLimits",
    "display_name",
    "find_loras",
    "inspect_lora",
    "load_lora",
    "locate_lora",
    "read_adapter_config",
    "read_header",
]
