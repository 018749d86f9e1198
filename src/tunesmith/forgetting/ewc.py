"""The diagonal Fisher information of the trainable parameters, for elastic weight consolidation.

``F_j = 1/N * sum_n (d loss_n / d theta_j)^2``, where ``loss_n`` is the mean next-token loss of
reference example ``n``, one example at a time (the squared gradient of a batch mean would
underestimate it). On text the model wrote itself ('generations'), the targets follow the model's own
distribution and this approaches the true Fisher; on a general-text file it is the empirical Fisher.
The pass stops after ``samples`` examples or ``max_seconds``, holds two copies of the trainable
weights (gradient and Fisher), and is cached on disk keyed by model, method, data and settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from tunesmith.core.files import atomic_path
from tunesmith.data.encode import EncodedExample
from tunesmith.training.batching import collate
from tunesmith.training.loss import count_target_tokens, loss_sum

FISHER_VERSION = 1


def diagonal_fisher(model: nn.Module, examples: Sequence[EncodedExample], pad_token_id: int,
                    device: torch.device | str = "cpu", max_seconds: Optional[float] = None,
                    progress: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Mean squared per-example gradient of every trainable parameter.

    The model is put in eval mode (no dropout) for the pass and restored afterwards.

    Args:
        model: The model with the method applied (only parameters with ``requires_grad`` count).
        examples: Reference examples; each is one forward and backward pass.
        pad_token_id: Padding id (unused with one example per batch, kept for ``collate``).
        device: Where the model is.
        max_seconds: Stop after this long, keeping the examples done (at least one).
        progress: Show a progress bar.

    Returns:
        ``({name: fisher (float32, the parameter's shape)}, examples used)``.
    """
    from tqdm.auto import tqdm

    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training = model.training
    model.eval()
    started, used = time.perf_counter(), 0
    for example in tqdm(examples, desc="Fisher", unit="example", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate([example], pad_token_id).items()}
        loss = loss_sum(model, batch) / max(count_target_tokens(batch), 1)
        gradients = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for name, gradient in zip(parameters, gradients):
            if gradient is not None:
                fisher[name] += gradient.detach().float().pow(2)
        used += 1
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    model.train(was_training)
    return {name: value / max(used, 1) for name, value in fisher.items()}, used


def normalise_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide by the mean over all entries, so EWC strength means the same on every model."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / max(count, 1)
    if mean <= 0:
        return fisher
    return {name: f / mean for name, f in fisher.items()}


def fisher_cache_key(model_name: str, method_config: dict, seed: int, data_identity: dict,
                     settings: dict, parameters: dict[str, torch.Size]) -> str:
    """A digest of everything the Fisher depends on (the trainable parameters' names and shapes too)."""
    description = {
        "version": FISHER_VERSION, "model": model_name, "method": method_config, "seed": seed,
        "data": data_identity, "settings": settings,
        "parameters": {name: list(shape) for name, shape in sorted(parameters.items())},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_identity(path: str) -> dict:
    """A reference file's identity for the cache key: its path, size and a digest of its content."""
    data = Path(path).read_bytes()
    return {"path": str(Path(path).resolve()), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_cached_fisher(path: Path) -> Optional[dict[str, torch.Tensor]]:
    """The cached Fisher at ``path``, or None."""
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else None


def save_cached_fisher(path: Path, fisher: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (temporary sibling, then rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as partial:
        save_file({n: f.contiguous().cpu() for n, f in fisher.items()}, str(partial), metadata=metadata)
