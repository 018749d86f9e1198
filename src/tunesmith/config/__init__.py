"""Recipes: the typed, frozen description of a run."""

from tunesmith.config.data import ColumnsSection, DataSection, DataSourceSection
from tunesmith.config.forgetting import EwcSection, RegulariseSection, RetainSection
from tunesmith.config.loader import apply_override, load_recipe, recipe_to_yaml, validate_recipe
from tunesmith.config.methods import FullMethod, LoraMethod, MethodSection, PartialMethod
from tunesmith.config.recipe import (
    EvalReportSection,
    EvalSection,
    GenerationTaskSection,
    ModelSection,
    OutputSection,
    Recipe,
)
from tunesmith.config.schema import schema_text
from tunesmith.config.speed import SpeedSection
from tunesmith.config.stages import (
    ClsStage,
    DpoStage,
    GrpoStage,
    KtoStage,
    OrpoStage,
    PtStage,
    RmStage,
    SftStage,
    SimpoStage,
    StageSection,
)
from tunesmith.config.train import EarlyStoppingSection, GaloreSection, TrainSection

__all__ = [
    "DataSection",
    "ColumnsSection",
    "DataSourceSection",
    "EarlyStoppingSection",
    "EvalReportSection",
    "EvalSection",
    "EwcSection",
    "FullMethod",
    "GaloreSection",
    "GenerationTaskSection",
    "GrpoStage",
    "LoraMethod",
    "MethodSection",
    "ModelSection",
    "OutputSection",
    "PartialMethod",
    "Recipe",
    "RegulariseSection",
    "RetainSection",
    "SftStage",
    "SimpoStage",
    "PtStage",
    "RmStage",
    "DpoStage",
    "OrpoStage",
    "KtoStage",
    "ClsStage",
    "SpeedSection",
    "StageSection",
    "TrainSection",
    "apply_override",
    "load_recipe",
    "recipe_to_yaml",
    "schema_text",
    "validate_recipe",
]
