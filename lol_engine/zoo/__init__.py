"""LoRA zoos from real models and real data: recipes, a resumable parallel builder and Parquet manifests.

``import lol_engine.zoo`` is light; torch training code, peft and the datasets load when a recipe runs.
"""

from lol_engine.zoo.build import ZooMismatchError, build_zoo
from lol_engine.zoo.manifest import read_manifest
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import get_recipe, list_recipes, register_recipe

__all__ = [
    "Recipe",
    "ZooMismatchError",
    "ZooSettings",
    "build_zoo",
    "get_recipe",
    "list_recipes",
    "read_manifest",
    "register_recipe",
]
