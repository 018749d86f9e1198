"""A plan from a model's shape alone, before anything loads: bf16 LoRA, QLoRA nf4 and full, with and without
activation checkpointing, on this machine and on GPUs of 24, 48 and 80 GB; the cheapest option that fits each.

The parameters are counted on the ``meta`` device (no weight of the model is allocated):

- weights: a LoRA base held in bfloat16 (the run computes in bfloat16), a QLoRA base in nf4 (its linear layers;
  the embeddings, norms and head in bfloat16), full fine-tuning in float32 (AdamW's master weights);
- gradients and AdamW's two float32 moments for the trainable parameters;
- activations: the bytes autograd saves per token (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by
  storage) in real forward passes under bfloat16 autocast of the shape cut to one and two blocks, with the method
  applied (:func:`saved_bytes_per_token`: a few hundred MB at 8B, never the model); with
  activation checkpointing each block keeps its input and one block is recomputed at a time;
- the chunked loss's logits (two float32 chunks of ``loss_chunk_tokens`` x vocabulary);
- on this machine the training process's own footprint (:func:`training_process_bytes`), on a GPU a CUDA context;
- QLoRA's load peak on this machine: the bfloat16 checkpoint mapped whole while bitsandbytes quantises it, beside
  the quantised weights (:func:`~tunesmith.workflows.plan.memory.load_peak_bytes`); the checkpoint stays mapped while
  the steps run, its unquantised bfloat16 weights views of it (``Memory.resident_peak``). Mapped file pages can be
  dropped by the kernel, so whether an option fits is judged on the training peak; the load peak is printed beside it.

The sum is scaled by the allocator's overhead, as :class:`~tunesmith.workflows.plan.memory.Memory` does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from tunesmith.config.loader import validate_method
from tunesmith.methods import build_method, count_parameters
from tunesmith.models.shapes import build_random_model
from tunesmith.workflows.plan.memory import (
    NF4_BYTES_PER_WEIGHT,
    Memory,
    quantisable_weight_count,
    training_process_bytes,
)
from tunesmith.workflows.plan.timing import matmul_flops_per_token

GPUS = {"GPU 24 GB": 24 * 2**30, "GPU 48 GB": 48 * 2**30, "GPU 80 GB": 80 * 2**30}
CUDA_CONTEXT = 600 * 2**20  # what a CUDA context and cuBLAS workspace take before any tensor (about)
NF4_SLOWDOWN = 1.3  # nf4 dequantises each weight before its matrix product; ranked as this much slower (assumed)
FIT_SHARE = 0.9  # as plan_recipe: an option fits when its peak stays under 90% of the memory


@dataclass(frozen=True)
class ShapeOption:
    """One way to train the shape: a method, with or without checkpointing, its peak memory and relative cost."""

    label: str
    kind: str  # lora | full
    quantize: str  # none | nf4
    checkpointing: bool
    trainable: int
    total: int
    memory: Memory  # process: this machine's training process (replaced by a CUDA context on a GPU)
    relative_cost: float  # step FLOPs per token relative to bf16 LoRA without checkpointing

    def peak(self, gpu: bool) -> int:
        """The training peak on a GPU or on this machine (what must stay resident while steps run)."""
        parts = self.memory.total - self.memory.process
        return parts + (CUDA_CONTEXT if gpu else self.memory.process)

    @property
    def resident_peak(self) -> int:
        """This machine's peak resident memory over the run, loading included (what ``summary.json`` reports)."""
        return self.memory.resident_peak


@dataclass(frozen=True)
class ShapePlan:
    """Every option's peak, and per target (this machine, each GPU) the cheapest option that fits."""

    model: str
    tokens: int  # tokens of the micro-batch
    options: list[ShapeOption]
    targets: dict[str, Optional[int]]  # target -> memory in bytes (this machine: available now)

    def choice(self, target: str) -> Optional[ShapeOption]:
        memory, gpu = self.targets[target], target != "this machine"
        fitting = [o for o in self.options if memory is None or o.peak(gpu) < FIT_SHARE * memory]
        return min(fitting, key=lambda o: o.relative_cost, default=None)


def plan_shape(config, name: str, tokens: int = 512, r: int = 16, available: Optional[int] = None) -> ShapePlan:
    """Plan ``config``'s shape for a micro-batch of ``tokens`` with LoRA/QLoRA rank ``r`` (``available``: bytes
    free on this machine, measured by the caller before anything loads)."""
    process = training_process_bytes()
    options = []
    baseline = None
    for kind, quantize in (("lora", "none"), ("lora", "nf4"), ("full", "none")):
        section = validate_method({"kind": "lora", "r": r, "alpha": 2 * r} if kind == "lora" else {"kind": "full"})
        model = build_method(section).apply(build_random_model(config, "meta"))
        trainable, total = count_parameters(model)
        if quantize == "none":  # nf4 saves what bf16 LoRA saves (its layers dequantise into bfloat16)
            per_token, blocks = saved_bytes_per_token(section, config, min(tokens, 256))
        for checkpointing in (False, True):
            activations = checkpointed_bytes(per_token, blocks, config, tokens) if checkpointing else per_token * tokens
            weights = base_weight_bytes(model, kind, quantize, total)
            # a QLoRA base's bfloat16 weights that are not quantised (nor linear: the adapters are) stay views of the
            # mapped bfloat16 checkpoint
            mapped = 2 * (total - quantisable_weight_count(model)) if quantize != "none" else 0
            chunk = min(1024, tokens)
            memory = Memory(process=process, weights=weights, gradients=4 * trainable, optimizer=8 * trainable,
                            activations=int(activations), logits=2 * chunk * config.vocab_size * 4, regularisers=0,
                            checkpoint=2 * total if quantize != "none" else 0,  # a bfloat16 checkpoint, as published
                            mapped_weights=mapped)
            flops = matmul_flops_per_token(kind, trainable, total, checkpointing)
            baseline = baseline or flops
            label = {"none": "bf16 LoRA", "nf4": "QLoRA nf4"}[quantize] + f" r={r}" if kind == "lora" else "full"
            options.append(ShapeOption(label + (" + checkpointing" if checkpointing else ""), kind, quantize,
                                       checkpointing, trainable, total, memory,
                                       flops / baseline * (NF4_SLOWDOWN if quantize == "nf4" else 1.0)))
    targets = {"this machine": available, **GPUS}
    return ShapePlan(name, tokens, options, targets)


def base_weight_bytes(model, kind: str, quantize: str, total: int) -> int:
    """Bytes of every weight: float32 for full, else a bfloat16 base (nf4 linear layers under QLoRA)."""

    if kind == "full":
        return 4 * total
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = total - trainable
    if quantize == "none":
        return 2 * frozen + 4 * trainable
    linear = quantisable_weight_count(model)
    return int(linear * NF4_BYTES_PER_WEIGHT + 2 * (frozen - linear) + 4 * trainable)


def saved_bytes_per_token(section, config, tokens: int) -> tuple[float, int]:
    """(bytes autograd saves per token in the model's body, number of blocks) with ``section``'s method applied.

    Measured in real forward passes, under bfloat16 autocast as training computes, of the same shape cut to one
    and to two blocks (with a small vocabulary: the logits are counted apart, by the chunked loss): their
    difference is one block's activations, and the model's are the one-block model's plus the other blocks'.
    The meta device cannot stand in here: autocast and the fused attention kernels do not run on it.
    Weights (and their autocast copies) are left out: they do not grow with tokens.
    """

    saved = []
    for blocks in (1, 2):
        cut = copy.deepcopy(config)
        cut.num_hidden_layers, cut.vocab_size = blocks, 256
        if getattr(cut, "layer_types", None):
            cut.layer_types = list(cut.layer_types[:blocks])
        torch.manual_seed(0)
        model = build_method(section).apply(build_random_model(cut, "cpu", torch.bfloat16 if section.kind != "full"
                                                               else torch.float32))
        saved.append(forward_saved_bytes(model, tokens))
        del model
    per_block = saved[1] - saved[0]
    return (saved[0] + (config.num_hidden_layers - 1) * per_block) / tokens, config.num_hidden_layers


def forward_saved_bytes(model, tokens: int) -> int:
    """Bytes autograd saves in one forward of the model's body over ``tokens`` tokens, weights left out."""
    shapes = {tuple(p.shape) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        if tuple(tensor.shape) not in shapes:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        # The storage, not the tensor: a saved output holds its own grad_fn, which holds it (a cycle in C++ that
        # Python's gc cannot see), so returning the tensor kept the whole graph and the model alive after the
        # measurement (2 GB at 1.7B in the plan check before every QLoRA run, docs/plan.md).
        return tensor.detach()

    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    model.train()
    ids = torch.randint(0, 256, (1, tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body(input_ids=ids)
    return sum(seen.values())


def checkpointed_bytes(per_token: float, blocks: int, config, tokens: int) -> float:
    """Saved bytes with activation checkpointing: each block's bfloat16 input, and one block recomputed."""
    return tokens * (blocks * config.hidden_size * 2 + per_token / blocks)


def describe_shape(plan: ShapePlan) -> str:
    """The options as a table, and per target the cheapest that fits, or one sentence when none does."""
    gb = 2**30
    targets = list(plan.targets)
    lines = [f"plan for the shape {plan.model}: micro-batch of {plan.tokens:,} tokens, nothing loaded (meta device)", "",
             "| option | trainable | weights | grads+optimizer | activations | load peak here | " + " | ".join(targets) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(targets)]
    for o in plan.options:
        m = o.memory
        cells = []
        for target in targets:
            memory, gpu = plan.targets[target], target != "this machine"
            fits = memory is None or o.peak(gpu) < FIT_SHARE * memory
            cells.append(f"{o.peak(gpu) / gb:.1f} GB {'fits' if fits else 'no'}")
        lines.append(f"| {o.label} | {o.trainable:,} | {m.weights / gb:.1f} GB | {(m.gradients + m.optimizer) / gb:.1f} GB | "
                     f"{m.activations / gb:.1f} GB | " + (f"{m.load_peak / gb:.1f} GB" if m.load_peak else "-") + " | "
                     + " | ".join(cells) + " |")
    if any(o.memory.load_peak for o in plan.options):
        lines.append("load peak: the bfloat16 checkpoint mapped while it is quantised (page cache the kernel can drop; "
                     "fitting is judged on the training peak)")
    lines.append("")
    for target in targets:
        memory = plan.targets[target]
        room = f" ({memory / gb:.1f} GB available)" if target == "this machine" and memory else ""
        choice = plan.choice(target)
        if choice is None:
            least = min(plan.options, key=lambda o: o.peak(target != "this machine"))
            lines.append(f"{target}{room}: nothing fits; the smallest, {least.label}, needs "
                         f"{least.peak(target != 'this machine') / gb:.1f} GB: use a shorter micro-batch (--tokens) or more memory")
        else:
            lines.append(f"{target}{room}: {choice.label}")
    return "\n".join(lines)
