"""Shapes of published models: their ``config.json`` numbers, to plan and benchmark real sizes without downloads.

Speed and memory do not depend on the weights' values, so a model built from one of these shapes with random
weights (on the ``meta`` device: nothing allocated; or for real) costs what the published model costs. The
numbers are copied from each model's published ``config.json`` on the Hugging Face Hub (the revision current in
2025); only the fields that set the shape and the attention are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import Registry


@dataclass(frozen=True)
class ModelShape:
    """A published model's architecture, without its weights.

    Attributes:
        name: The shape's name, as ``tunesmith plan --shape`` takes it.
        hub_id: The published model whose ``config.json`` the numbers come from.
        config: Those numbers (``model_type`` and the architecture's fields).
        parameters: The parameter count the model card states (checked by the tests against the built model).
    """

    name: str
    hub_id: str
    config: dict = field(default_factory=dict)
    parameters: int = 0


SHAPES: Registry[ModelShape] = Registry("model shape")

SHAPES.register("smollm2-1.7b")(ModelShape(
    "smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152, "max_position_embeddings": 8192,
     "rms_norm_eps": 1e-5, "rope_theta": 130000.0, "tie_word_embeddings": True, "hidden_act": "silu"},
    1_711_376_384))
SHAPES.register("qwen2.5-3b")(ModelShape(
    "qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct",
    {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
     "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
     "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
     "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 70},
    3_085_938_688))
SHAPES.register("llama-3.1-8b")(ModelShape(
    "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct",
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}},
    8_030_261_248))


def shape_config(name: str):
    """The transformers config of a registered shape, or of a model folder or ``config.json`` (nothing loaded).

    Raises:
        TunesmithError: For a name that is neither a shape nor a folder/file holding a ``config.json``.
    """
    from transformers import AutoConfig

    if name in SHAPES:
        values = dict(SHAPES.get(name).config)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise TunesmithError(f"--shape {name} is neither a built-in shape ({', '.join(SHAPES.names())}) nor a model "
                             "folder or config.json; give one of those")
    values = json.loads(file.read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_random_model(config, device: str = "meta", dtype: torch.dtype = torch.float32):
    """A causal LM of ``config``'s shape with random weights: on ``meta`` nothing is allocated.

    For real (``device="cpu"``) the weights are created directly in ``dtype`` (no float32 copy first).
    """
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model


def write_random_checkpoint(config, folder, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 * 2**30,
                            seed: int = 0) -> Path:
    """Save a random-weight checkpoint of ``config``'s shape into ``folder``, one tensor at a time.

    The model is built on the ``meta`` device (nothing allocated) only to name and shape its parameters; each
    weight is then drawn in ``dtype`` (a few rows at a time, so no float32 copy of a large embedding either) and
    written into safetensors shards of at most ``shard_bytes``, with the index ``from_pretrained`` reads. At most
    one shard is in memory: an 8B bfloat16 checkpoint (16 GB) is written in about 2 GB. Weights are drawn as
    transformers initialises them (normal, std ``initializer_range``), norms are ones, biases zeros. Tied
    weights are written once.

    Returns:
        The folder (``config.json``, ``model-0000N-of-0000M.safetensors``, ``model.safetensors.index.json``).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skeleton = build_random_model(config, "meta", dtype)
    named = list(skeleton.named_parameters())  # each shared (tied) parameter once, under its first name
    del skeleton
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    paths: list[Path] = []

    def flush() -> None:
        nonlocal size
        path = folder / f"model-{len(paths) + 1:05d}.partial.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        paths.append(path)
        shards[-1] = {}
        size = 0

    for name, parameter in named:
        nbytes = parameter.numel() * parameter.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
        shards[-1][name] = random_tensor(name, tuple(parameter.shape), dtype, std, generator)
        size += nbytes
    if shards[-1]:
        flush()
    weight_map = {}
    for index, path in enumerate(paths, 1):
        final = folder / f"model-{index:05d}-of-{len(paths):05d}.safetensors"
        path.replace(final)
        with safe_open(str(final), "pt") as handle:
            weight_map.update({key: final.name for key in handle.keys()})
    total = sum(p.numel() * p.element_size() for _, p in named)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(folder)
    return folder


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, std: float, generator: torch.Generator) -> torch.Tensor:
    """One random weight as transformers initialises it, drawn in blocks of rows in ``dtype``."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype) if "norm" in name else torch.zeros(shape, dtype=dtype)
    tensor = torch.empty(shape, dtype=dtype)
    rows = max(1, 2**24 // max(1, tensor[0].numel()))  # about 64 MB of float32 at a time
    for start in range(0, shape[0], rows):
        block = tensor[start:start + rows]
        block.copy_(torch.randn(block.shape, generator=generator) * std)
    return tensor
