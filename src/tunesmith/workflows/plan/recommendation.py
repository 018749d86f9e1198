"""The plan of each method and the recommendation: it fits, the data suffice for it, and it is quick."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

from tunesmith.config import Recipe
from tunesmith.config.loader import validate_method
from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import available_memory_bytes, cache_dir, pick_device
from tunesmith.data import encode_data
from tunesmith.data.prepare.sufficiency import RULES, judge, sufficiency_verdict
from tunesmith.methods import METHODS, build_method
from tunesmith.models import load_model_and_tokenizer
from tunesmith.workflows.plan.memory import (
    Memory,
    activation_bytes,
    checkpoint_bytes,
    meta_parameter_counts,
    training_process_bytes,
    weight_bytes,
)
from tunesmith.workflows.plan.timing import (
    CALIBRATION_STEPS,
    COSTED_STEPS,
    calibrate_time,
    largest_micro_batch_tokens,
    matmul_flops_per_token,
    other_seconds,
    run_steps,
    scaled_token_seconds,
    step_costs,
    validation_costs,
)


@dataclass(frozen=True)
class MethodPlan:
    """One method's plan."""

    kind: str
    label: str
    trainable: int
    total: int
    memory: Memory
    seconds_per_step: Optional[float]
    steps: int
    fits: bool
    data_level: str  # enough | few | too few | unknown (sufficiency rule of thumb)
    data_note: str
    calibrated: bool  # timed directly, not scaled from another method
    other_seconds: float = 0.0  # start, first step's warm-up and validation passes (see run_time)

    @property
    def run_seconds(self) -> Optional[float]:
        return None if self.seconds_per_step is None else self.seconds_per_step * self.steps + self.other_seconds


@dataclass
class Plan:
    """The whole plan, printable and machine-readable."""

    model: str
    device: str
    micro_batch_tokens: int
    steps: int
    data: dict
    methods: list[MethodPlan]
    available_memory: Optional[int]
    calibration: dict
    recommendation: str = ""
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        document = asdict(self)
        for entry, method in zip(document["methods"], self.methods):
            entry["memory"]["total"] = method.memory.total
            entry["memory"]["load_peak"] = method.memory.load_peak
            entry["run_seconds"] = method.run_seconds
        return document


def plan_recipe(recipe: Recipe, methods: str = "recipe", calibrate: bool = True, say=print,
                calibration: Optional[dict] = None) -> Plan:
    """Plan ``recipe`` for its own method (``methods="recipe"``) or for every method (``"all"``).

    Args:
        calibration: A calibration of another recipe on the same model and batch layout to scale the
            step time from (default: calibrate this recipe, when ``calibrate``).

    Raises:
        TunesmithError: For an unknown ``methods`` value, or what loading the model or data raises.
    """
    if methods not in ("recipe", "all"):
        raise TunesmithError(f"--methods {methods} is not one of: recipe, all")
    process = training_process_bytes()
    device = pick_device(recipe.train.device, 0)
    available = available_memory_bytes(device)  # before the model loads: its own weights are not "used by others"
    say(f"loading {recipe.model.name} and preparing the data ...")
    model, tokenizer = load_model_and_tokenizer(recipe.model, cache_dir(), "cpu")
    data = encode_data(recipe.data, tokenizer, recipe.train.seed)
    lengths = [len(example.input_ids) for example in data.train]
    steps = run_steps(recipe, len(lengths))
    micro_tokens = largest_micro_batch_tokens(recipe, lengths, steps)
    sections = method_sections(recipe, methods)
    if calibration is None:
        calibration = calibrate_time(recipe, say, step_costs(recipe, lengths, CALIBRATION_STEPS)) if calibrate else {}
    costs = step_costs(recipe, lengths, min(max(steps, CALIBRATION_STEPS), COSTED_STEPS))
    plans = [plan_method(recipe, section, model, tokenizer, data, process, micro_tokens, steps, calibration, available,
                         costs) for section in sections]
    total = plans[0].total if plans else 0
    plan = Plan(recipe.model.name, str(device), micro_tokens, steps, data_summary(data, lengths, total), plans,
                available, calibration)
    plan.recommendation, plan.reasons = recommend(plan, recipe.method.kind)
    return plan


def method_sections(recipe: Recipe, methods: str) -> list:
    """The recipe's method section, or one per registered method (the recipe's own where it is one of them)."""
    if methods == "recipe":
        return [recipe.method]
    sections = []
    for kind in METHODS.names():
        sections.append(recipe.method if kind == recipe.method.kind else validate_method({"kind": kind}))
    return sections


def plan_method(recipe: Recipe, section, model, tokenizer, data, process: int, micro_tokens: int, steps: int,
                calibration: dict, available: Optional[int], costs: list[int]) -> MethodPlan:
    """Parameters, memory, time and data verdict of one method (``available``: memory free before loading)."""
    method = build_method(section)
    trainable, total = meta_parameter_counts(model.config, section)
    regularise = recipe.regularise
    anchors = (2 * trainable * 4 if regularise.ewc is not None else 0) + (trainable * 4 if regularise.l2sp else 0)
    saved_per_token, fixed, logits = activation_bytes(recipe, section, model, tokenizer, data, micro_tokens)
    memory = Memory(process=process, weights=weight_bytes(recipe, method, model, total), gradients=trainable * 4,
                    optimizer=2 * trainable * 4, activations=int(saved_per_token * micro_tokens + fixed), logits=logits,
                    regularisers=anchors, checkpoint=checkpoint_bytes(recipe, method))
    per_token = scaled_token_seconds(calibration, method.kind, trainable, total, recipe, costs)
    seconds = other = None
    if per_token is not None:
        seconds = per_token * statistics.fmean(costs[1:steps] or costs[:1])
        other = other_seconds(recipe, calibration, per_token, costs[0], validation_costs(recipe, data),
                              2 * total / matmul_flops_per_token(method.kind, trainable, total,
                                                                 recipe.train.speed.activation_checkpointing), steps)
    level, note = data_fit(section, len(data.train), sum(len(e.input_ids) for e in data.train), total)
    return MethodPlan(section.kind, method_label(section), trainable, total, memory, seconds, steps,
                      available is None or memory.total < 0.9 * available, level, note,
                      calibration.get("method") == section.kind, other or 0.0)


def method_label(section) -> str:
    if section.kind == "lora":
        return f"lora r={section.r}" + (" (dora)" if getattr(section, "dora", False) else "")
    return section.kind


def data_fit(section, examples: int, tokens: int, parameters: int) -> tuple[str, str]:
    """The sufficiency rule of thumb that applies to this method."""
    if section.kind == "full":
        rule = RULES[2]
    elif section.kind == "lora" and section.r > 16:
        rule = RULES[1]
    else:
        rule = RULES[0]
    return judge(rule, examples, tokens, parameters)


def data_summary(data, lengths: list[int], parameters: int) -> dict:
    """Size, lengths, duplicates and the verdict of ``tunesmith data inspect``."""

    ids = [tuple(example.input_ids) for example in data.train]
    ordered = sorted(lengths)
    return {"examples": len(lengths), "tokens": sum(lengths),
            "length": {"min": ordered[0], "p50": ordered[len(ordered) // 2],
                       "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], "max": ordered[-1]},
            "exact_duplicates": len(ids) - len(set(ids)),
            "stats": {split: vars(stats) for split, stats in data.stats.items()},
            "verdict": sufficiency_verdict(len(set(ids)), sum(lengths), parameters)}


def recommend(plan: Plan, recipe_kind: str) -> tuple[str, list[str]]:
    """The method to use, and why: it fits in memory, the data suffice for it, and it is quick."""
    reasons = []
    for method in plan.methods:
        memory = f"{method.memory.total / 2**30:.2f} GB"
        time = f", about {human_seconds(method.run_seconds)}" if method.run_seconds is not None else ""
        problems = ([] if method.fits else ["does not fit in the memory available"]) + \
            ([method.data_note] if method.data_level in ("few", "too few") else [])
        reasons.append(f"{method.label}: {memory}{time}" + (f" and {' and '.join(problems)}" if problems else ""))
    usable = [m for m in plan.methods if m.fits and m.data_level == "enough"] or [m for m in plan.methods if m.fits]
    if not usable:
        return "none fits: lower train.batch_size or data.max_length, or turn on train.speed.activation_checkpointing", reasons
    own = next((m for m in usable if m.kind == recipe_kind), None)
    quickest = min(usable, key=lambda m: (m.run_seconds or 0, m.memory.total))
    choice = own if own is not None and (own.run_seconds or 0) <= 1.5 * (quickest.run_seconds or 0) else quickest
    return choice.label, reasons


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
