"""Model ids and the models behind them.

A model id is one of:

- a built-in alias (``smollm2-135m-instruct``) or a base model given at start (``--model``);
- a workspace folder holding a Hugging Face model (``models/stories260k``, ``exports/x``);
- a trained run in the workspace (``runs/x``: its ``adapter/`` on the base it was trained from,
  or its ``model/``), or a run's ``adapter/`` folder itself.

Loading goes through :mod:`tunesmith.inference.generate` (``load_for_inference``, ``load_trained``). Adapters
written by peft on the same base share one loaded base: the first is put on it with
``load_trained``, later ones are added with peft's ``load_adapter`` and chosen per batch with
``set_adapter``; the base itself answers with the adapters disabled.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.inference.results import ResultFolder, locate_result
from tunesmith.methods.base import MANIFEST
from tunesmith.serve.workspace import Workspace


class UnknownModel(TunesmithError):
    """A model id that names nothing servable."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model id stands for: a base path and, optionally, a trained result on it."""

    model_id: str
    base: str  # alias, or absolute folder
    adapter: Optional[str] = None  # absolute folder of a trained result, or None


@dataclass
class LoadedBase:
    """One loaded base model and the peft adapters added to it."""

    model: object
    tokenizer: object
    adapters: dict[str, str] = field(default_factory=dict)  # adapter folder -> peft adapter name
    invariant: bool = False  # decodes batch-invariant (see batch_invariant)


@dataclass
class Servable:
    """What generation needs for one model id."""

    model_id: str
    model: object
    tokenizer: object
    adapter_name: Optional[str]  # peft adapter to set; None with a peft model means "adapters off"
    invariant: bool = False  # its batches run batch-invariant: a seed gives the same tokens in any company

    @contextlib.contextmanager
    def active(self):
        """Select this id's adapter on a shared base for the duration of one batch."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield
        elif self.adapter_name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.adapter_name)
            yield


class ModelPool:
    """Resolves model ids and keeps what was loaded (one copy per base)."""

    def __init__(self, workspace: Workspace, bases: dict[str, str] | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        self.workspace = workspace
        self.bases = dict(bases or {})  # id given at start -> alias or folder
        self.device = device
        self.dtype, self.dtype_reason = serving_dtype(dtype, device)  # of every loaded model (serve --dtype)
        self.loaded: dict[str, LoadedBase] = {}
        self.separate: dict[str, Servable] = {}  # results that cannot share a base (full, partial)
        self.lock = threading.Lock()

    # --- ids -----------------------------------------------------------------------------------

    def list_ids(self) -> list[dict]:
        """Every servable id: bases given at start, built-in aliases, workspace models, runs, exports."""
        from tunesmith.models.aliases import ALIASES

        entries = [{"id": name, "kind": "base"} for name in self.bases]
        entries += [{"id": name, "kind": "alias"} for name in ALIASES.names() if name not in self.bases]
        for folder, kind in (("models", "base"), ("exports", "export"), ("runs", "run")):
            for path in sorted((self.workspace.root / folder).glob("*")):
                if path.is_dir() and self._servable(path):
                    entries.append({"id": f"{folder}/{path.name}", "kind": kind})
        return entries

    def spec(self, model_id: str) -> ModelSpec:
        """What ``model_id`` names.

        Raises:
            UnknownModel: If it is neither a known base nor a servable workspace folder.
        """
        from tunesmith.models.aliases import ALIASES

        if model_id in self.bases:
            return ModelSpec(model_id, self.bases[model_id])
        if model_id in ALIASES:
            return ModelSpec(model_id, model_id)
        try:
            folder = self.workspace.resolve(model_id, must_exist=True)
        except TunesmithError:
            raise UnknownModel(f"model '{model_id}' is not an alias, a base given at start or a workspace "
                               "model, run or export folder; GET /v1/models lists them") from None
        try:
            found = locate_result(folder)  # inference/results.py: the one reading of what a folder holds
        except TunesmithError as error:
            if (folder / MANIFEST).is_file():
                raise  # a damaged manifest is its own sentence
            raise UnknownModel(f"workspace folder '{model_id}' holds no model, trained result or finished run") from error
        if found is None:
            raise UnknownModel(f"workspace folder '{model_id}' holds no model, trained result or finished run")
        if found.kind == "model" and found.manifest is None:
            return ModelSpec(model_id, str(found.folder))  # a plain model folder: a base of its own
        return ModelSpec(model_id, self._base_of(found, self.workspace.root), str(found.folder))

    @staticmethod
    def _servable(folder: Path) -> bool:
        try:
            return locate_result(folder) is not None
        except TunesmithError:
            return False

    @staticmethod
    def _base_of(found: ResultFolder, root: Path) -> str:
        """The base model a trained result was trained from (its manifest, or the peft config).

        A relative folder is relative to the workspace: the studio's jobs run there.
        """
        name = found.recorded_base  # results.py reads what a result records
        if not name and found.manifest is not None and (found.folder / "adapter_config.json").is_file():
            name = ResultFolder(found.folder, "adapter").recorded_base  # a manifest without base_model: the peft config
        if not name:
            raise UnknownModel(f"{found.folder} does not record its base model")
        if not Path(name).is_absolute() and (root / name).is_dir():
            return str((root / name).resolve())
        return name

    # --- loading -------------------------------------------------------------------------------

    def get(self, model_id: str) -> Servable:
        """The loaded model for ``model_id`` (loading it on first use)."""
        spec = self.spec(model_id)
        with self.lock:
            return self._load(spec)

    def _load(self, spec: ModelSpec) -> Servable:
        from tunesmith.inference.generate import load_for_inference, load_trained

        if spec.adapter in self.separate:
            return self.separate[spec.adapter]
        adapter = Path(spec.adapter) if spec.adapter is not None else None
        if adapter is not None and (not (adapter / "adapter_config.json").is_file() or _trained_over_quantised(adapter)):
            # full or partial fine-tuning rewrites base weights, and a QLoRA adapter learned against the base's
            # rounded weights (load_result rebuilds them, as generate does): each gets a model of its own
            from peft import PeftModel

            model, tokenizer = load_for_inference(spec.base, spec.adapter, dtype=self.dtype, device=self.device)
            name = model.active_adapter if isinstance(model, PeftModel) else None  # None on a peft model: adapters off
            self.separate[spec.adapter] = Servable(spec.model_id, model, tokenizer, name, batch_invariant(model))
            return self.separate[spec.adapter]
        base = self.loaded.get(spec.base)
        if base is None:
            model, tokenizer = load_for_inference(spec.base, dtype=self.dtype, device=self.device)
            base = self.loaded[spec.base] = LoadedBase(model, tokenizer, invariant=batch_invariant(model))
        if adapter is None:
            return Servable(spec.model_id, base.model, base.tokenizer, None, base.invariant)
        tokenizer = _result_tokenizer(adapter, spec.base, base.tokenizer)
        if spec.adapter not in base.adapters:
            from peft import PeftModel

            name = f"a{len(base.adapters)}"
            if isinstance(base.model, PeftModel):
                base.model.load_adapter(str(adapter), adapter_name=name)
            else:
                base.model = load_trained(base.model, adapter).eval()
                name = base.model.active_adapter
            base.adapters[spec.adapter] = name
        return Servable(spec.model_id, base.model, tokenizer, base.adapters[spec.adapter], base.invariant)


def serving_dtype(asked: str, device: str) -> tuple[str, str]:
    """``serve --dtype``'s dtype and why: ``auto`` is bfloat16 where ``device`` computes it natively (AMX, AVX-512
    BF16, a recent GPU), else float32 (emulated bfloat16 is slower)."""
    if asked != "auto":
        return asked, f"{asked} (--dtype {asked})"
    import torch

    from tunesmith.core.runtime import bfloat16_support

    support = bfloat16_support(torch.device(device))
    if support is None:
        return "float32", f"float32 (--dtype auto: no native bfloat16 on this {torch.device(device).type.upper()})"
    return "bfloat16", f"bfloat16, batch-invariant (--dtype auto: {support})"


def batch_invariant(model) -> bool:
    """Whether ``model``'s batches should run batch-invariant: it computes in bfloat16/float16 (float32 batches
    differ from lone rows only in bits that rarely reach a token) and this machine's kernels allow it for its shapes
    (checked now; a log line says so when they do not)."""
    from tunesmith.inference.invariant import check_row_invariance, wants_row_invariance

    return wants_row_invariance(model) and check_row_invariance(model)


def _trained_over_quantised(folder: Path) -> bool:
    """Whether the result in ``folder`` was trained over a quantised base (its manifest's ``quantized_base``)."""
    found = locate_result(folder)
    return bool(found is not None and (found.manifest or {}).get("quantized_base"))


def _result_tokenizer(adapter: Path, base: str, base_tokenizer):
    """The tokenizer saved with a result (it carries the training chat template), else the base's."""
    if not (adapter / "tokenizer_config.json").is_file():
        return base_tokenizer
    from tunesmith.config import ModelSection
    from tunesmith.data.templates import resolve_template
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(str(adapter), ModelSection(name=base))
    resolve_template(tokenizer, "auto")
    return tokenizer
