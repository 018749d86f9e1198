"""Export a trained result as a Hugging Face folder, a plain ``peft`` adapter or a GGUF file, checked by reloading.

Every export is written to a temporary sibling of ``--out``, reloaded (transformers, peft, the
transformers GGUF loader, and llama.cpp through the npm package ``node-llama-cpp`` where it is installed) and compared with
the in-memory model on probe prompts (:mod:`tunesmith.export.check`); only a passing export is
renamed into place. Mergeable methods (the LoRA family, IA3; full and partial are plain weights
already) fold into the base weights for ``hf`` and ``gguf``; the others raise
:class:`~tunesmith.methods.NotMergeable` with the reason and the suggestion to export ``peft``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_folder
from tunesmith.core.runtime import cache_dir
from tunesmith.export.check import TOLERANCES, CheckResult, Probe, check_hf_model, probe_reference, require
from tunesmith.export.gguf import QUANTISATIONS, check_architecture, export_gguf
from tunesmith.export.model_card import run_card_facts, write_card
from tunesmith.inference.results import LoadedResult, ResultFolder, load_result, locate_result
from tunesmith.methods import NotMergeable
from tunesmith.methods.base import base_model_of
from tunesmith.models import resolve_model_path
from tunesmith.stages.cls import LABELS_FILE, head_scores
from tunesmith.stages.scoring import HEAD_ATTRIBUTE, HEAD_FILE, load_head

FORMATS = ("hf", "peft", "gguf")


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how the reloaded result compares with the trained one.

    Attributes:
        checks: One check per loader (``transformers``, ``peft``, ``llama.cpp``), by name.
        skipped: Loaders that could not be tried, with the reason.
        load_seconds: How long the transformers reload took.
    """

    out: Path
    method: str
    format: str
    quantize: Optional[str]
    files: tuple[Path, ...]
    checks: dict[str, CheckResult]
    load_seconds: float
    skipped: dict[str, str] = field(default_factory=dict)
    head: str = ""  # the head check of a classifier or reward model (stage cls/rm), when it has one

    @property
    def max_logit_difference(self) -> float:
        return max(check.max_logit_difference for check in self.checks.values())

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def describe(self) -> str:
        lines = [f"exported {self.method} result as {self.format}{' ' + self.quantize if self.quantize else ''} to "
                 f"{self.out} ({self.size_bytes / 2**20:.1f} MiB)"]
        lines += [f"  {loader}: {check.describe()}" for loader, check in self.checks.items()]
        lines += [f"  {loader}: not checked ({reason})" for loader, reason in self.skipped.items()]
        lines += [f"  head: {self.head}"] if self.head else []
        return "\n".join(lines)


def export(source: str | Path, out: str | Path, format: str = "hf", quantize: Optional[str] = None,
           ollama: bool = False, base_model: Optional[str] = None, device: str = "cpu") -> ExportReport:
    """Write ``source`` (a run folder, an adapter folder or a model folder) as ``format`` into ``out``.

    Args:
        format: ``hf`` (merged model folder), ``peft`` (the adapter as plain peft loads it) or ``gguf``.
        quantize: For ``gguf``: ``f16`` (default), ``q8_0`` or ``q4_0``.
        ollama: For ``gguf``: also write an Ollama ``Modelfile`` with the chat template and stop token.
        base_model: Base model of an adapter; default: the one its manifest records.

    Returns:
        The report, with the checks that passed.

    Raises:
        TunesmithError: For a folder that is not a result, an occupied ``out``, a format the result
            cannot take (``NotMergeable`` says why), an architecture the GGUF writer does not know,
            or an export that fails its check (nothing is left at ``out`` then).
    """
    out = Path(out).expanduser().absolute()  # the llama.cpp check runs in another folder: a relative --out broke it
    location = validate_request(source, out, format, quantize, ollama)
    quantize = (quantize or "f16") if format == "gguf" else None
    if format == "gguf":
        check_architecture(base_config(location, base_model), quantize)
    loaded = load_result(source, base_model, device=device)
    head_reference = reference_head(loaded, location.folder)
    probe = probe_reference(loaded.model, loaded.tokenizer)
    method = loaded.method.kind if loaded.method is not None else ("peft" if location.kind == "adapter" else "model")
    with atomic_folder(out, fixed_name=True, only_empty=True) as partial:  # out: absent or empty (checked above)
        if format == "peft":
            files, checks, skipped, seconds = export_peft(location, loaded, probe, partial, device)
        else:
            plain = merged_model(loaded)
            if format == "hf":
                files, checks, skipped, seconds = export_hf(plain, loaded.tokenizer, probe, partial, device)
            else:
                files, checks, skipped, seconds = export_gguf(plain, loaded.tokenizer, probe, partial, quantize,
                                                              ollama, out.name)
        for loader, check in checks.items():
            require(check, f"the {format} export reloaded with {loader}")
        head = ""
        if head_reference is not None:
            files, head = files + copy_head(location.folder, partial, format), check_head(head_reference, partial, format,
                                                                                          loaded, device)
        write_export_card(location, partial, format, quantize, checks, skipped)
    files = tuple(out / path.relative_to(partial) for path in files)
    return ExportReport(out, method, format, quantize, files, checks, seconds, skipped, head)


HEAD_PROBES = ("The match ended in a late goal.", "Parliament votes on the new budget today.",
               "A telescope finds a planet.", "Shares fell sharply on Monday.")


def reference_head(loaded: LoadedResult, folder: Path):
    """For a result with a head (stage cls or rm): the head's scores of the probe texts, from the trained
    model with its head; the head is then taken off again so the language model exports as usual. None otherwise."""

    if not (folder / HEAD_FILE).is_file():
        return None
    model = load_head(loaded.model, folder)
    labels = json.loads((folder / LABELS_FILE).read_text()) if (folder / LABELS_FILE).is_file() else None
    probabilities = head_scores(model, loaded.tokenizer, list(HEAD_PROBES))
    delattr(base_model_of(model), HEAD_ATTRIBUTE)
    return probabilities, labels


def copy_head(folder: Path, partial: Path, format: str) -> tuple[Path, ...]:
    """Copy head.safetensors and labels.json into the export (the peft export copied them with the adapter)."""

    names = [name for name in (HEAD_FILE, LABELS_FILE) if (folder / name).is_file()]
    if format != "peft":
        for name in names:
            shutil.copy2(folder / name, partial / name)
    return tuple(partial / name for name in names if format != "peft")


def check_head(reference, partial: Path, format: str, loaded: LoadedResult, device: str) -> str:
    """Reload the exported model with its head and compare the head's scores with the trained model's.

    Raises:
        TunesmithError: If the head or labels did not come back, or the probabilities differ.
    """
    import torch
    from transformers import AutoModelForCausalLM


    probabilities, labels = reference
    if format == "peft":
        from peft import PeftModel


        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(loaded.base_model, cache_dir()), dtype=torch.float32)
        model = PeftModel.from_pretrained(base.to(device), partial).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).to(device).eval()
    model = load_head(model, partial)
    exported = head_scores(model, loaded.tokenizer, list(HEAD_PROBES))
    difference = float((exported - probabilities).abs().max())
    if labels is not None and json.loads((partial / LABELS_FILE).read_text()) != labels:
        raise TunesmithError(f"the {format} export's {LABELS_FILE} differs from the trained result's")
    if difference > 1e-4:
        raise TunesmithError(f"the {format} export with its head gives scores up to {difference:.2e} away from the "
                             "trained model's (tolerance 1e-4)")
    named = f"{len(labels)} labels" if labels is not None else "scores"
    return (f"head.safetensors and {LABELS_FILE if labels is not None else 'no labels'} reloaded: {named}, scores "
            f"within {difference:.1e} of the trained model's on {len(HEAD_PROBES)} probe texts")


def export_result(result: str | Path, out: str | Path, merge: bool, model_name: Optional[str] = None,
                  device: str = "cpu") -> ExportReport:
    """The ``--adapter DIR --merge`` form: a merged Hugging Face folder (kept for existing callers).

    Raises:
        TunesmithError: As :func:`export`, and when an adapter is given without ``merge``.
    """
    location = locate_result(result)
    if location is not None and location.kind == "adapter" and not merge:
        raise TunesmithError(f"{result} is an adapter; add --merge to fold it into the base weights "
                             "(or export it as it is with --format peft)")
    return export(result, out, "hf", base_model=model_name, device=device)


def write_export_card(location: ResultFolder, partial: Path, format: str, quantize: Optional[str],
                      checks: dict[str, CheckResult], skipped: dict[str, str]) -> None:
    """The export's model card: the run's card with the checks the export passed (only for a run's result)."""
    run = location.run_dir or location.folder.parent
    verdicts = {loader: "passed: " + check.describe() for loader, check in checks.items()}
    verdicts.update({loader: f"not checked ({reason})" for loader, reason in skipped.items()})
    facts = run_card_facts(run, verdicts, f"{format} {quantize}" if quantize else format)
    if facts is not None:
        write_card(partial, facts)


def validate_request(source, out: Path, format: str, quantize: Optional[str], ollama: bool) -> ResultFolder:
    """Refuse what cannot work before anything is loaded or written.

    Raises:
        TunesmithError: Naming the flag or folder at fault.
    """
    if format not in FORMATS:
        raise TunesmithError(f"--format {format} is not one of {', '.join(FORMATS)}")
    if quantize is not None and format != "gguf":
        raise TunesmithError(f"--quantize applies to --format gguf only (got --format {format})")
    if quantize is not None and quantize not in QUANTISATIONS:
        raise TunesmithError(f"--quantize {quantize} is not one of {', '.join(QUANTISATIONS)}")
    if ollama and format != "gguf":
        raise TunesmithError("--ollama needs --format gguf (Ollama runs GGUF files)")
    location = locate_result(source)
    if location is None:
        raise TunesmithError(f"{source} is not a folder; give a run folder, its adapter/ or model/ folder, or a "
                             "model folder")

    if format == "gguf" and (location.folder / HEAD_FILE).is_file():
        raise TunesmithError(f"{location.folder} has a trained head ({HEAD_FILE}: a classifier or reward model) and "
                             "GGUF cannot hold it; export it with --format hf (merged model + head + labels) or --format "
                             "peft (adapter + head + labels)")
    if format == "peft" and location.kind != "adapter":
        raise TunesmithError(f"{location.folder} is a complete model, not an adapter; export it with --format hf or gguf")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunesmithError(f"export folder {out} is not empty; choose another --out")
    return location


def base_config(location: ResultFolder, base_model: Optional[str]):
    """The model config, read without loading weights (to refuse an architecture early)."""
    from transformers import AutoConfig


    if location.kind == "model":
        return AutoConfig.from_pretrained(location.folder)
    base = base_model or location.recorded_base
    if base is None:
        raise TunesmithError(f"{location.folder} is an adapter without a recorded base model; give --model")
    return AutoConfig.from_pretrained(resolve_model_path(base, cache_dir()))


def merged_model(loaded: LoadedResult):
    """Plain base weights with the result folded in.

    Raises:
        NotMergeable: With the method's reason and the suggestion to export ``peft``.
    """
    try:
        if loaded.method is not None:
            return loaded.method.merge(loaded.model)
    except NotMergeable as error:
        raise NotMergeable(f"{error}; export the adapter as it is with --format peft") from None
    return loaded.model.merge_and_unload() if hasattr(loaded.model, "merge_and_unload") else loaded.model


def export_hf(plain, tokenizer, probe: Probe, partial: Path, device: str):
    """``save_pretrained`` the merged model and tokenizer, then reload with transformers and compare."""
    import torch
    from transformers import AutoModelForCausalLM

    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).to(device).eval()
    seconds = time.perf_counter() - started
    files = tuple(sorted(p for p in partial.rglob("*") if p.is_file()))
    return files, {"transformers": check_hf_model(probe, reloaded, TOLERANCES["hf"])}, {}, seconds


def export_peft(location: ResultFolder, loaded: LoadedResult, probe: Probe, partial: Path, device: str):
    """Copy the adapter folder, then load it with plain ``peft`` on a fresh base model and compare.

    Raises:
        TunesmithError: When the method's result is not a peft adapter (bottleneck adapters).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM


    if not (location.folder / "adapter_config.json").is_file():
        raise TunesmithError(f"the {loaded.method.kind if loaded.method else ''} result in {location.folder} is not a "
                             "peft adapter (it has no adapter_config.json), so plain peft cannot load it; use it "
                             "through tunesmith, or merge it with --format hf where the method allows")
    shutil.copytree(location.folder, partial, dirs_exist_ok=True)
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(loaded.base_model, cache_dir()), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base.to(device), partial).eval()
    seconds = time.perf_counter() - started
    files = tuple(sorted(p for p in partial.rglob("*") if p.is_file()))
    return files, {"peft": check_hf_model(probe, reloaded, TOLERANCES["peft"])}, {}, seconds
