"""LoftQ initialisation of LoRA over an nf4 base (``method.init: loftq``).

QLoRA starts with B = 0, so training starts from the quantised model, which differs from the
full-precision one by the 4-bit rounding of every weight. LoftQ (Li et al., 2023,
https://arxiv.org/abs/2310.08659) starts B·A instead as the best rank-r approximation of that rounding
error, ``W - dequantise(nf4(W))``, so the adapted model starts as close to the full-precision model as
rank r allows. This is one LoftQ iteration with the base left as bitsandbytes quantised it, which is
what peft's ``replace_lora_weights_loftq`` does; that function is not used because it moves every
matrix to CUDA unconditionally (no CPU path) and ignores LoRA's ``alpha / r`` scaling, which this one
divides out (peft 0.21). The full-precision weights are read one tensor at a time from the model's
safetensors files, never as a whole second model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from tunesmith.core.errors import TunesmithError

logger = logging.getLogger(__name__)


def checkpoint_tensors(path: str) -> dict[str, Path]:
    """Map each tensor name of the checkpoint at ``path`` (a folder or a cached hub id) to its safetensors file.

    Raises:
        TunesmithError: When there are no safetensors files to read the full-precision weights from.
    """
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(path, local_files_only=True, allow_patterns=["*.safetensors*"]))
        except (OSError, ValueError):  # not in the local hub cache (or not a hub id): no files to read
            folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise TunesmithError(f"method.init: loftq reads the full-precision weights from the model's safetensors "
                             f"files, and {path} has none; use method.init: default")
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def loftq_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's (A, B) with ``scaling * B @ A`` the best rank-``rank`` approximation of ``residual`` (out, in).

    The singular values are split evenly between the two factors, as in LoftQ. A rank above the matrix's
    smaller side leaves the extra rows of A and columns of B at zero (the approximation is then exact).
    """
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    kept = min(rank, s.numel())
    root = (s[:kept] / scaling).sqrt()
    lora_a = residual.new_zeros((rank, residual.shape[1]), dtype=torch.float32)  # (rank, in)
    lora_b = residual.new_zeros((residual.shape[0], rank), dtype=torch.float32)  # (out, rank)
    lora_a[:kept] = root[:, None] * vh[:kept]
    lora_b[:, :kept] = u[:, :kept] * root[None, :]
    return lora_a, lora_b


@torch.no_grad()
def loftq_initialise(model: nn.Module, checkpoint: str, adapter: str = "default") -> tuple[int, float]:
    """Set every LoRA layer over an nf4 base layer to LoftQ's start (see the module's docstring).

    Args:
        model: A peft model whose LoRA layers wrap bitsandbytes ``Linear4bit`` layers.
        checkpoint: The folder (or hub id) the base was loaded from, with its full-precision weights.
        adapter: The peft adapter's name.

    Returns:
        How many layers were initialised, and the quantisation error left, as a fraction of the error
        before (Frobenius norm over all those layers).

    Raises:
        TunesmithError: When no LoRA layer wraps a 4-bit layer, or a weight is missing from the checkpoint.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    files = checkpoint_tensors(checkpoint)
    prefix = getattr(model.get_base_model(), "base_model_prefix", "")
    layers = [(name, module) for name, module in model.get_base_model().named_modules()
              if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit)]
    if not layers:
        raise TunesmithError("method.init: loftq corrects an nf4 base, and no LoRA layer here wraps a 4-bit layer; "
                             "set model.quantize: nf4 or use method.init: default")
    error_before = error_after = 0.0
    for name, module in layers:
        key = next((k for k in (f"{name}.weight", f"{name.removeprefix(prefix + '.')}.weight") if k in files), None)
        if key is None:
            raise TunesmithError(f"method.init: loftq: {checkpoint} has no weight {name}.weight to correct; "
                                 "use method.init: default")
        with safe_open(files[key], framework="pt") as handle:
            weight = handle.get_tensor(key).float()  # (out, in)
        base = module.get_base_layer().weight
        residual = weight - bnb.functional.dequantize_4bit(base.data, base.quant_state).float().to(weight.device)
        lora_a, lora_b = loftq_factors(residual, module.r[adapter], module.scaling[adapter])
        module.lora_A[adapter].weight.data.copy_(lora_a)
        module.lora_B[adapter].weight.data.copy_(lora_b)
        error_before += float(residual.pow(2).sum())
        error_after += float((residual - module.scaling[adapter] * lora_b @ lora_a).pow(2).sum())
    left = (error_after / error_before) ** 0.5 if error_before else 0.0
    logger.info("LoftQ: %d nf4 layers start corrected; %.1f%% of the quantisation error left", len(layers), 100 * left)
    return len(layers), left
