"""Export a trained result as a plain Hugging Face model folder, checked by loading it back.

Mergeable methods (the LoRA family, IA3; full and partial are plain weights already) fold their
result into the base weights; the others raise :class:`~tunesmith.methods.NotMergeable` with the
reason. The written folder is reloaded with ``AutoModelForCausalLM`` and its logits compared with
those of base + result before merging.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from tunesmith.errors import TunesmithError
from tunesmith.methods import MANIFEST, build_method

PROBE_TEXT = "Fine-tuning folds what was learned into the weights."
TOLERANCE = 1e-3  # largest |logit difference| accepted between merged and unmerged (float32)


@dataclass(frozen=True)
class ExportReport:
    """What ``export_result`` wrote and how well the reloaded folder matches."""

    out: Path
    method: str
    max_logit_difference: float


def export_result(result: str | Path, out: str | Path, merge: bool, model_name: Optional[str] = None,
                  device: str = "cpu") -> ExportReport:
    """Write ``result`` (a run's ``adapter/`` or ``model/``) as a plain model folder ``out``.

    Args:
        result: The trained result folder (with ``tunesmith.json``).
        out: Folder to write; must not exist or be empty.
        merge: Fold an adapter into the base weights (required for adapter results).
        model_name: Base model; default: the one recorded in the result's manifest.

    Returns:
        The report, including the largest logit difference after reloading.

    Raises:
        TunesmithError: If the folder is not a result, ``out`` is occupied, ``--merge`` is missing
            for an adapter, the method is not mergeable (``NotMergeable``), or the reloaded model
            does not reproduce the unmerged logits.
    """
    from tunesmith.config.loader import validate_method
    from tunesmith.inference import load_for_inference

    result, out = Path(result), Path(out)
    manifest = read_manifest(result)
    method = build_method(validate_method(manifest["config"], source=str(result / MANIFEST)))
    if method.artifact == "adapter" and not merge:
        raise TunesmithError(f"{result} is an adapter; add --merge to fold it into the base weights")
    if out.exists() and any(out.iterdir()):
        raise TunesmithError(f"export folder {out} is not empty; choose another --out")
    model, tokenizer = load_for_inference(model_name or manifest["base_model"], str(result), device=device)
    probe = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        expected = model(input_ids=probe).logits.float()
    plain = method.merge(model)
    write_folder(plain, tokenizer, out)
    difference = reload_difference(out, probe, expected, device)
    if difference > TOLERANCE:
        raise TunesmithError(f"the exported model in {out} differs from the trained result by {difference:.2e} "
                             "in its logits; please report this")
    return ExportReport(out, method.kind, difference)


def read_manifest(result: Path) -> dict:
    """The manifest a run wrote beside its result.

    Raises:
        TunesmithError: If ``result`` has none.
    """
    from tunesmith.methods.base import read_manifest as read_method_manifest

    return read_method_manifest(result)


def write_folder(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """``save_pretrained`` into a temporary sibling, renamed into place when complete."""
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)


def reload_difference(out: Path, probe: torch.Tensor, expected: torch.Tensor, device: str) -> float:
    """Largest |logit difference| between the reloaded folder and ``expected``."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits.float()
    return float((logits - expected).abs().max())
