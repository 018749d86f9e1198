"""Peak memory of one configuration: weights (quantised or not), gradients, optimizer, activations, logits."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from tunesmith.config import Recipe
from tunesmith.config.recipe import TRAINS_BASE_WEIGHTS
from tunesmith.core.files import write_text_atomic
from tunesmith.core.runtime import cache_dir, pick_device, process_memory_bytes
from tunesmith.methods import build_method, count_parameters
from tunesmith.methods.base import logical_numel, transformer_blocks
from tunesmith.models import resolve_model_path
from tunesmith.training.speed import apply_speed, autocast_dtype

PROBE_TOKENS = 256  # tokens of the micro-batch whose saved activations are measured
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
    checkpoint: int = 0  # a quantised base's checkpoint, mapped from the load to the end (0: not quantised)
    mapped_weights: int = 0  # of ``weights``, those that stay views of the mapped checkpoint (counted in it)

    @property
    def total(self) -> int:
        """The training peak: what must stay resident while steps run."""
        parts = self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.regularisers
        return self.process + int(parts * ALLOCATOR_OVERHEAD)

    @property
    def load_peak(self) -> int:
        """The resident peak while a quantised base loads (0 when the base is not quantised): see :func:`load_peak_bytes`."""
        return load_peak_bytes(self.process, self.checkpoint, self.weights) if self.checkpoint else 0

    @property
    def resident_peak(self) -> int:
        """The process's peak resident memory over the run (what ``summary.json`` reports): loading, or training with
        a quantised base's checkpoint still mapped (its pages stayed resident through whole 1.7B and 3B QLoRA runs,
        and the bfloat16 weights that were not quantised, embeddings and norms, stayed views of it: docs/plan.md)."""
        in_checkpoint = int(self.mapped_weights * ALLOCATOR_OVERHEAD)  # counted once, as mapped pages
        return max(self.total - in_checkpoint + self.checkpoint, self.load_peak)


def load_peak_bytes(process: int, checkpoint: int, weights: int) -> int:
    """Peak resident memory while transformers loads a checkpoint and bitsandbytes quantises it.

    Measured on random-weight checkpoints of SmolLM2-1.7B's shape (docs/plan.md): transformers maps the
    safetensors shards and reads every tensor of them before the load ends, so the whole checkpoint becomes
    resident as mapped file pages (``RssFile``: page cache, which the kernel may drop under pressure, but
    counted in the peak resident set) beside the quantised weights already built (``RssAnon``). A float copy
    of the whole base is not held: the anonymous part stays near the quantised weights.
    """
    return process + int((checkpoint + weights) * ALLOCATOR_OVERHEAD)


NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit codes, an 8-bit scale per 64, a float per 256 scales
INT8_BYTES_PER_WEIGHT = 1.0  # plus one float scale per row, negligible


def weight_bytes(recipe: Recipe, method, model, total: int) -> int:
    """Bytes the base weights take while ``section``'s method trains.

    A quantised base (``model.quantize``, methods with a frozen base) holds its linear layers' weights in nf4
    or int8 and the rest (embeddings, norms, head) in the recipe's dtype; a frozen base under bfloat16
    autocast is held in bfloat16 (training/speed.py); otherwise every weight takes the recipe's dtype.
    """

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


def checkpoint_bytes(recipe: Recipe, method) -> int:
    """Bytes of the checkpoint files a quantised base is loaded from (0 when the base is not quantised or not on disk)."""
    from pathlib import Path


    if recipe.model.quantize == "none" or method.kind in TRAINS_BASE_WEIGHTS:
        return 0
    folder = Path(resolve_model_path(recipe.model.name, cache_dir()))
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith((".safetensors", ".bin")))


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
    try:
        return json.loads(cache.read_text())["bytes"]
    except (OSError, ValueError, KeyError):  # absent or unreadable: measure again (it is written whole, atomically)
        pass
    code = ("import tunesmith.pipeline.finetune, transformers.models.llama.modeling_llama, peft\n"
            "from tunesmith.core.runtime import process_memory_bytes\nprint(process_memory_bytes())")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if completed.returncode != 0:
        return process_memory_bytes()
    measured = int(completed.stdout.strip().splitlines()[-1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps({"bytes": measured}) + "\n")
    return measured


def meta_parameter_counts(config, section) -> tuple[int, int]:
    """(trainable, total) with the method applied to the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return count_parameters(build_method(section).apply(skeleton))


def activation_bytes(recipe: Recipe, section, model, tokenizer, data, micro_tokens: int) -> tuple[float, int, int]:
    """(saved bytes per token, saved bytes that do not grow with tokens, bytes of the loss's logits).

    Measured in one real forward of a short micro-batch.

    The forward runs through the speed seams of training (``apply_speed``), so packing, the chunked
    loss, autocast and activation checkpointing save exactly what they save in a run. Checkpointing
    recomputes one block at a time in the backward pass: one block's activations are added back.
    """

    method = build_method(section)
    trial = method.apply(copy.deepcopy(model)).train()
    probe = probe_examples(data, PROBE_TOKENS)
    speed = apply_speed(trial, method, recipe.train.speed, recipe.train, torch.device("cpu"))
    batch = speed.collate_fn(probe, tokenizer.pad_token_id)
    tokens = sum(len(e.input_ids) for e in probe)
    seen: dict[int, tuple[int, tuple]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = (max(seen.get(storage.data_ptr(), (0, ()))[0], storage.nbytes()), tuple(tensor.shape))
        return tensor.detach()  # not the tensor: a saved output would keep its graph alive (shapes.forward_saved_bytes)

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
