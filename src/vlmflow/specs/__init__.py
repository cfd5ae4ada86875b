"""Typed recipe specs (pydantic v2) and their YAML loader."""

from vlmflow.specs.loader import load_recipe
from vlmflow.specs.recipe import Recipe

__all__ = ["Recipe", "load_recipe"]
