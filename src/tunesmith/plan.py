"""``tunesmith plan``: before training, what each method costs here, and which to use.

For the recipe's method (or every method) the plan gives the parameters and trainable share,
peak memory broken down, the time per step and for the run, the data verdict, and a
recommendation with its reasons. Where the numbers come from:

- parameters: the method applied to the model built on the ``meta`` device (no weights allocated);
- weights, gradients, optimizer state (AdamW: two float32 moments), EWC/L2-SP copies: counted
  from those parameters;
- activations: the bytes autograd saves in one real forward pass of a short micro-batch, through
  the same speed seams training uses (packing, chunked loss, autocast, checkpointing), measured
  with ``torch.autograd.graph.saved_tensors_hooks`` and scaled to the run's largest micro-batch;
- the process's own footprint (interpreter, torch, transformers) measured in this process;
- time per step: a short calibration run of the recipe (a few timed steps in a subprocess, cached),
  as seconds per computed token (padding included), times the mean tokens of the run's own steps
  (drawn as the sampler draws them); scaled to other methods by their matrix-product FLOPs;
- time for the run: the steps, plus what a run does besides steps, timed in the same calibration:
  the start (imports, model load, data preparation, the final save), the first step's warm-up, and
  every validation pass (forward passes over the validation set, at the forward's share of a step's FLOPs).

Measured against real runs in docs/plan.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tunesmith.config import Recipe
from tunesmith.config.loader import validate_method
from tunesmith.config.recipe import TRAINS_BASE_WEIGHTS
from tunesmith.data import prepare_data
from tunesmith.data.prepare.sufficiency import RULES, judge
from tunesmith.errors import TunesmithError
from tunesmith.methods import METHODS, build_method, count_parameters
from tunesmith.methods.base import logical_numel
from tunesmith.models import load_model_and_tokenizer
from tunesmith.runtime import available_memory_bytes, cache_dir, pick_device, process_memory_bytes

PROBE_TOKENS = 256  # tokens of the micro-batch whose saved activations are measured
CALIBRATION_STEPS = 4  # timed steps of the calibration run (the first is left out as warm-up)
CALIBRATION_FORMAT = 2  # 2: per-step times from step_s, rates per computed token, start-up timed
COSTED_STEPS = 2000  # the mean step is drawn from at most this many of the run's steps
# The allocator keeps freed blocks and cannot always reuse them: peak resident memory on these
# machines ran this much above the sum of the parts (docs/plan.md, fitted on stories260k and SmolLM2).
ALLOCATOR_OVERHEAD = 1.10


@dataclass(frozen=True)
class Memory:
    """Estimated peak memory of one configuration, in bytes, by part."""

    process: int  # interpreter, torch, transformers, tokenizer (measured here)
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for the backward pass at the largest micro-batch
    logits: int  # the loss's logits (one chunk with the chunked loss, else every token)
    regularisers: int  # EWC Fisher + anchor, L2-SP anchor

    @property
    def total(self) -> int:
        parts = self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.regularisers
        return self.process + int(parts * ALLOCATOR_OVERHEAD)


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
    data = prepare_data(recipe.data, tokenizer, recipe.train.seed)
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


NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit codes, an 8-bit scale per 64, a float per 256 scales
INT8_BYTES_PER_WEIGHT = 1.0  # plus one float scale per row, negligible


def weight_bytes(recipe: Recipe, method, model, total: int) -> int:
    """Bytes the base weights take while ``section``'s method trains.

    A quantised base (``model.quantize``, methods with a frozen base) holds its linear layers' weights in nf4
    or int8 and the rest (embeddings, norms, head) in the recipe's dtype; a frozen base under bfloat16
    autocast is held in bfloat16 (training/speed.py); otherwise every weight takes the recipe's dtype.
    """
    from tunesmith.training.speed import autocast_dtype

    dtype_bytes = torch.finfo(torch.float32 if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)).bits // 8
    frozen_base = method.kind not in TRAINS_BASE_WEIGHTS
    if getattr(method, "frozen_base_in_autocast_dtype", False) \
            and autocast_dtype(recipe.train.speed, pick_device(recipe.train.device, 0)) is not None:
        dtype_bytes = 2
    if recipe.model.quantize == "none" or not frozen_base:
        return total * dtype_bytes
    linear = quantisable_weight_count(model)
    per_weight = NF4_BYTES_PER_WEIGHT if recipe.model.quantize == "nf4" else INT8_BYTES_PER_WEIGHT
    return int(linear * per_weight + (total - linear) * dtype_bytes)


def quantisable_weight_count(model) -> int:
    """Weights of the linear layers bitsandbytes quantises: every ``nn.Linear`` but the output head."""
    head = model.get_output_embeddings()
    return sum(logical_numel(module.weight) for module in model.modules()
               if isinstance(module, torch.nn.Linear) and module is not head)


def training_process_bytes() -> int:
    """Resident memory of a fresh process that imported what a training run imports, before any model.

    Measured once per interpreter and library versions, and cached.
    """
    import transformers

    key = hashlib.sha256(f"{sys.executable} {torch.__version__} {transformers.__version__}".encode()).hexdigest()[:12]
    cache = cache_dir() / "plan" / f"process-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["bytes"]
    code = ("import tunesmith.finetune, transformers.models.llama.modeling_llama, peft\n"
            "from tunesmith.runtime import process_memory_bytes\nprint(process_memory_bytes())")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if completed.returncode != 0:
        return process_memory_bytes()
    measured = int(completed.stdout.strip().splitlines()[-1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"bytes": measured}) + "\n")
    return measured


def run_steps(recipe: Recipe, examples: int) -> int:
    """Optimizer steps of the run, as the loop counts them."""
    global_batch = recipe.train.batch_size * recipe.train.grad_accum
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, round(recipe.train.epochs * max(1, examples // global_batch)))


def largest_micro_batch_tokens(recipe: Recipe, lengths: list[int], steps: int) -> int:
    """Tokens of the largest micro-batch the run will see (its activations set the peak).

    Packed: the sum of the micro-batch's lengths; padded: its size times its longest example.
    Drawn as the sampler draws (a permutation per epoch) for the run's steps, at the recipe's seed.
    """
    batch, packed = recipe.train.batch_size, recipe.train.speed.packing
    per_step = batch * recipe.train.grad_accum
    order_of = {}
    largest = 0
    steps_per_epoch = max(1, len(lengths) // per_step)
    for step in range(steps):
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in order_of:
            order_of = {epoch: torch.randperm(len(lengths), generator=torch.Generator().manual_seed(recipe.train.seed + epoch))}
        chosen = order_of[epoch][within * per_step:(within + 1) * per_step].tolist()
        for start in range(0, len(chosen), batch):
            micro = [lengths[i] for i in chosen[start:start + batch]]
            largest = max(largest, sum(micro) if packed else len(micro) * max(micro))
    return largest


def step_costs(recipe: Recipe, lengths: list[int], steps: int) -> list[int]:
    """Tokens each optimizer step computes, padding included, drawn by the run's own sampler.

    Packed: the sum of the step's lengths; padded: each micro-batch's size times its longest example
    (regrouped by length as the run does). Step time follows these, not the real tokens alone.
    """
    from tunesmith.training.sampler import build_sampler

    train = recipe.train
    packed = train.speed.packing
    grouped = train.speed.group_by_length and not packed and train.grad_accum > 1  # as prepare_speed decides
    sampler = build_sampler(len(lengths), (), train.batch_size, train.grad_accum, 1, 0, train.seed,
                            lengths if grouped else None)
    costs = []
    for step in range(steps):
        micro = [[lengths[i] for i in indices] for indices in sampler.micro_batches(step)]
        costs.append(sum(sum(m) if packed else len(m) * max(m) for m in micro if m))
    return costs


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
                    regularisers=anchors)
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


def validation_costs(recipe: Recipe, data) -> int:
    """Tokens one validation pass computes: batches of ``eval.batch_size`` in order, each padded to its longest."""
    examples = list(data.validation or ())
    batch = recipe.eval.batch_size
    return sum(len(chunk) * max(len(e.input_ids) for e in chunk)
               for chunk in (examples[i:i + batch] for i in range(0, len(examples), batch)))


def other_seconds(recipe: Recipe, calibration: dict, per_token: float, first_cost: int, validation_tokens: int,
                  forward_share: float, steps: int) -> float:
    """What a run spends besides its steps' median time: start, warm-up and validation passes.

    - start: imports, model load, data preparation and the final save, timed in the calibration
      (its whole wall time less its training loop);
    - warm-up: the first step takes longer (allocator, kernels chosen, lazy initialisation): its excess
      over the calibrated rate, as the calibration measured it;
    - validation: ``steps // eval.every_steps`` passes during the run and one at its end (where
      there is validation data), each the validation tokens at the forward's share of a step's cost.
    """
    start = calibration.get("startup_seconds", 0.0)
    first = calibration.get("first_step_seconds")
    calibration_first_cost = (calibration.get("step_costs") or [first_cost])[0]
    warm_up = max(0.0, first - per_token * calibration_first_cost) if first is not None else 0.0
    passes = 0
    if validation_tokens:
        passes = 1 + (steps // recipe.eval.every_steps if recipe.eval.every_steps else 0)
    return start + warm_up + passes * validation_tokens * per_token * forward_share


def method_label(section) -> str:
    if section.kind == "lora":
        return f"lora r={section.r}" + (" (dora)" if getattr(section, "dora", False) else "")
    return section.kind


def meta_parameter_counts(config, section) -> tuple[int, int]:
    """(trainable, total) with the method applied to the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return count_parameters(build_method(section).apply(skeleton))


def activation_bytes(recipe: Recipe, section, model, tokenizer, data, micro_tokens: int) -> tuple[float, int, int]:
    """(saved bytes per token, saved bytes that do not grow with tokens, bytes of the loss's logits).

    Measured in one real forward of a short micro-batch.

    The forward runs through the speed seams of training (``prepare_speed``), so packing, the chunked
    loss, autocast and activation checkpointing save exactly what they save in a run. Checkpointing
    recomputes one block at a time in the backward pass: one block's activations are added back.
    """
    from tunesmith.methods.base import transformer_blocks
    from tunesmith.training.speed import prepare_speed

    method = build_method(section)
    trial = method.apply(copy.deepcopy(model)).train()
    probe = probe_examples(data, PROBE_TOKENS)
    speed = prepare_speed(trial, method, recipe.train.speed, recipe.train, torch.device("cpu"))
    batch = speed.collate_fn(probe, tokenizer.pad_token_id)
    tokens = sum(len(e.input_ids) for e in probe)
    seen: dict[int, tuple[int, tuple]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = (max(seen.get(storage.data_ptr(), (0, ()))[0], storage.nbytes()), tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = speed.token_loss(trial, batch)
    del loss
    speed.undo()
    parameters = {p.untyped_storage().data_ptr() for p in trial.parameters()}
    weight_shapes = {tuple(p.shape) for p in trial.parameters()}
    # saved weights themselves are not activations; their autocast copies are, but do not grow with tokens
    fixed = sum(size for pointer, (size, shape) in seen.items() if pointer not in parameters and shape in weight_shapes)
    saved = sum(size for pointer, (size, shape) in seen.items() if pointer not in parameters and shape not in weight_shapes)
    per_token = saved / tokens
    if recipe.train.speed.activation_checkpointing:
        per_token *= 1 + 1 / len(transformer_blocks(trial))
    vocab = model.config.vocab_size
    logit_tokens = min(recipe.train.speed.loss_chunk_tokens, micro_tokens) if recipe.train.speed.chunked_loss \
        else micro_tokens
    # logits, their float32 log-softmax, and its gradient live together in the backward pass
    logits = 3 * logit_tokens * vocab * 4 if not recipe.train.speed.chunked_loss else 2 * logit_tokens * vocab * 4
    return per_token, fixed, logits


def probe_examples(data, tokens: int) -> list:
    """Training examples adding up to about ``tokens`` (at least one)."""
    chosen, total = [], 0
    for example in data.train:
        if chosen and total + len(example.input_ids) > tokens:
            break
        chosen.append(example)
        total += len(example.input_ids)
    return chosen


def matmul_flops_per_token(kind: str, trainable: int, total: int, checkpointing: bool) -> float:
    """Matrix-product FLOPs per token of one training step (PERF-NOTES.md's formulas).

    Forward 2N, gradient of the inputs 2N, gradients of trained weights 2 per trained weight; full
    and partial train base weights, the adapters' own weights are few. Checkpointing adds a forward.
    """
    forward = 2 * total
    weight_gradients = 2 * trainable
    return forward * (2 if checkpointing else 1) + 2 * total + weight_gradients


def scaled_token_seconds(calibration: dict, kind: str, trainable: int, total: int, recipe: Recipe,
                         costs: list[int]) -> Optional[float]:
    """Seconds per computed token of a step: the calibrated method's, scaled by FLOPs for another method.

    The calibration ran the run's first steps (same data, seed and batch layout), so its steps
    computed ``costs[:CALIBRATION_STEPS]`` tokens; a calibration from before this was recorded
    (no ``step_costs``) is read as seconds per step of the mean step.
    """
    if not calibration:
        return None
    checkpointing = recipe.train.speed.activation_checkpointing
    own = matmul_flops_per_token(kind, trainable, total, checkpointing)
    reference = matmul_flops_per_token(calibration["method"], calibration["trainable"], calibration["total"],
                                       checkpointing)
    if "seconds_per_token" in calibration:
        per_token = calibration["seconds_per_token"]
    else:
        per_token = calibration["seconds_per_step"] / statistics.fmean(costs)
    return per_token * own / reference


def calibrate_time(recipe: Recipe, say=print, costs: Optional[list[int]] = None, cached: bool = True) -> dict:
    """Time a few steps of the recipe in a subprocess (cached by recipe, machine and library versions).

    Args:
        costs: Tokens each of the run's first steps computes (:func:`step_costs`); default: read
            from the calibration's own data (prepared again here).
        cached: Reuse a cached calibration; False times it again (and replaces the cached one).

    Returns:
        ``{"method", "seconds_per_token", "seconds_per_step", "first_step_seconds", "startup_seconds",
        "step_costs", "trainable", "total", "peak_memory_mb", "cached"}``.
    """
    key = calibration_key(recipe)
    cache = cache_dir() / "plan" / f"calibration-{key}.json"
    if cached and cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}
    with tempfile.TemporaryDirectory(prefix="tunesmith-plan-") as folder:
        recipe_file = Path(folder) / "recipe.yaml"
        recipe_file.write_text(calibration_recipe(recipe, Path(folder) / "run"))
        say(f"calibrating: {CALIBRATION_STEPS} timed steps of the recipe ...")
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(recipe_file), "--no-progress"],
                                   capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TunesmithError(f"the calibration run of the recipe failed: {tail[0]}")
        run = Path(folder) / "run"
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if "step_s" in s and "step" in s]
        summary = json.loads((run / "summary.json").read_text())
    if costs is None:
        costs = calibration_costs(recipe)
    costs = costs[:len(steps)]
    # step_s is each step's own time; the records' "tokens" are cumulative (tokens/tokens_per_s was
    # the step's time times its index: the old calibration's bias, 3x here against 5x in an 8-step run)
    timed = list(zip(steps, costs))[1:] or list(zip(steps, costs))
    per_token = statistics.median(record["step_s"] / cost for record, cost in timed)
    result = {"method": recipe.method.kind, "seconds_per_token": per_token,
              "seconds_per_step": statistics.median(record["step_s"] for record, _ in timed),
              "first_step_seconds": steps[0]["step_s"], "step_costs": costs,
              "step_seconds": [record["step_s"] for record in steps], "train_seconds": summary["wall_time_s"],
              "step_tokens": [b - a for a, b in zip([0] + [r["tokens"] for r in steps], [r["tokens"] for r in steps])],
              "startup_seconds": max(0.0, wall - summary["wall_time_s"]),
              "trainable": summary["trainable_parameters"], "total": summary["total_parameters"],
              "steps_timed": len(timed), "peak_memory_mb": summary["peak_memory_mb"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


def calibration_costs(recipe: Recipe) -> list[int]:
    """:func:`step_costs` of the calibration's steps, from the recipe's data prepared here."""
    from tunesmith.models import resolve_model_path
    from tunesmith.models.loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(recipe.model.name, cache_dir()), recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.train.seed)
    return step_costs(recipe, [len(e.input_ids) for e in data.train], CALIBRATION_STEPS)


def calibration_recipe(recipe: Recipe, out: Path) -> str:
    """The recipe cut to a few logged steps, nothing evaluated or checkpointed, into ``out``."""
    import yaml

    from tunesmith.config import recipe_to_yaml

    raw = yaml.safe_load(recipe_to_yaml(recipe))
    raw["train"].update(max_steps=CALIBRATION_STEPS, log_every=1, checkpoint_every=None, early_stopping=None)
    raw["eval"].update(every_steps=None, task=None, report=None)
    raw["output"].update(dir=str(out), overwrite=True, tensorboard=False)
    raw["retain"] = None
    return yaml.safe_dump(raw)


def calibration_key(recipe: Recipe) -> str:
    """What the step time depends on: the model, method, batch layout, speed options and this machine."""
    parts = {"format": CALIBRATION_FORMAT, "model": recipe.model.model_dump(mode="json"), "method": recipe.method.model_dump(mode="json"),
             "data": recipe.data.model_dump(mode="json"), "batch": recipe.train.batch_size,
             "accum": recipe.train.grad_accum, "speed": recipe.train.speed.model_dump(mode="json"),
             "device": recipe.train.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


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
    from tunesmith.data.prepare.sufficiency import sufficiency_verdict

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


def describe(plan: Plan) -> str:
    """The plan as a table and a few sentences."""
    gb = 2**30
    lines = [f"plan for {plan.model} on {plan.device}: {plan.steps} steps, largest micro-batch {plan.micro_batch_tokens:,} "
             "tokens", "",
             "| method | trainable | of | memory | weights | grads | optimizer | activations | logits | EWC/L2-SP | "
             "process | s/step | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in plan.methods:
        mem = m.memory
        step = f"{m.seconds_per_step:.2f}{'' if m.calibrated else '*'}" if m.seconds_per_step is not None else "n/a"
        run = human_seconds(m.run_seconds) if m.run_seconds is not None else "n/a"
        lines.append(f"| {m.label} | {m.trainable:,} ({100 * m.trainable / m.total:.2f}%) | {m.total:,} | "
                     f"{mem.total / gb:.2f} GB | {mem.weights / gb:.2f} | {mem.gradients / gb:.2f} | "
                     f"{mem.optimizer / gb:.2f} | {mem.activations / gb:.2f} | {mem.logits / gb:.2f} | "
                     f"{mem.regularisers / gb:.2f} | {mem.process / gb:.2f} | {step} | {run} |")
    if any(not m.calibrated and m.seconds_per_step is not None for m in plan.methods):
        lines.append("* scaled from the calibrated method by matrix-product FLOPs")
    if plan.available_memory:
        lines.append(f"memory available: {plan.available_memory / gb:.1f} GB")
    lines += ["", f"data: {plan.data['verdict']}", f"recommendation: {plan.recommendation}"]
    lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)
