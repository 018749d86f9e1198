"""Recipes: the typed, frozen description of a run."""

from tunesmith.config.loader import apply_override, load_recipe, recipe_to_yaml, validate_recipe
from tunesmith.config.methods import FullMethod, LoraMethod, MethodSection, PartialMethod
from tunesmith.config.recipe import (
    DataSection,
    EarlyStoppingSection,
    EvalReportSection,
    EvalSection,
    GenerationTaskSection,
    ModelSection,
    OutputSection,
    Recipe,
    TrainSection,
)
from tunesmith.config.schema import schema_text

__all__ = [
    "DataSection",
    "EarlyStoppingSection",
    "EvalReportSection",
    "EvalSection",
    "FullMethod",
    "GenerationTaskSection",
    "LoraMethod",
    "MethodSection",
    "ModelSection",
    "OutputSection",
    "PartialMethod",
    "Recipe",
    "TrainSection",
    "apply_override",
    "load_recipe",
    "recipe_to_yaml",
    "schema_text",
    "validate_recipe",
]
