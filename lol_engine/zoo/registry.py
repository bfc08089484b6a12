"""The registry of zoo recipes: ``register_recipe`` adds one, ``get_recipe`` builds it by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lol_engine.errors import NotFoundError
from lol_engine.zoo.recipe import Recipe

__all__ = ["get_recipe", "list_recipes", "recipe_class", "register_recipe"]

_RECIPES: dict[str, type[Recipe]] = {}
_BUILTIN = ("digits", "fashion_gen", "mobilenet_fashion", "minilm_wordnet")


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe available under ``cls.name``."""
    if cls.name in _RECIPES and _RECIPES[cls.name] is not cls:
        raise ValueError(f"a recipe named {cls.name!r} is already registered")
    _RECIPES[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN:  # importing a recipe module registers it; heavy imports stay inside the recipes' methods
        try:
            importlib.import_module(f"lol_engine.zoo.recipes.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lol_engine.zoo.recipes.{module}":
                raise


def list_recipes() -> dict[str, str]:
    """``{name: one-line description}`` of every registered recipe."""
    _load_builtins()
    return {name: cls.description for name, cls in sorted(_RECIPES.items())}


def recipe_class(name: str) -> type[Recipe] | None:
    """The registered recipe class named ``name``, or None (its descriptions are class attributes: no instance)."""
    _load_builtins()
    return _RECIPES.get(name)


def get_recipe(name: str) -> Recipe:
    """A new instance of the named recipe; the error lists the known names."""
    _load_builtins()
    factory: Callable[[], Recipe] | None = _RECIPES.get(name)
    if factory is None:
        raise NotFoundError(f"unknown zoo recipe {name!r}; known: {', '.join(sorted(_RECIPES))}")
    return factory()
