"""What the pairwise stages (rm, dpo, orpo, simpo) share: batches of pairs, their loss, their metrics.

A micro-batch of pairs is collated as its chosen sequences followed by its rejected ones, padded or
packed by the run's collate function, so a pair stage keeps the speed levers of SFT. Each stage
says how one batch becomes a loss per pair and per-pair metrics; summing, the loop's units (pairs),
sharded evaluation and the metric means are here once.
"""

from __future__ import annotations

import copy
import hashlib
from abc import abstractmethod
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from tunesmith.config import DataSection
from tunesmith.core.files import atomic_path
from tunesmith.core.reporter import Reporter
from tunesmith.core.runtime import Runtime
from tunesmith.data.encode import EncodedExample
from tunesmith.data.encoded import EncodedData
from tunesmith.data.preference import EncodedPair, encode_judged
from tunesmith.stages.base import Stage
from tunesmith.stages.scoring import count_sequences, reply_logps
from tunesmith.training.chunked_loss import unwrap
from tunesmith.training.objective import Objective
from tunesmith.training.packing import enable_packed_attention
from tunesmith.training.speed import SpeedSetup

PairValues = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (pairs,) loss and (pairs,) metrics by name


class PairObjective(Objective):
    """An :class:`~tunesmith.training.objective.Objective` over preference pairs; units are pairs."""

    counted: str = "pairs"  # how evaluate names the number of items it scored

    def __init__(self, speed: SpeedSetup) -> None:
        self.collate_fn = speed.collate_fn
        self.forward = speed.under_autocast(self.per_pair)

    @abstractmethod
    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        """The loss of each pair in ``batch`` and the metrics :meth:`evaluate` averages."""

    def collate(self, examples: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
        return self.collate_fn([pair.chosen for pair in examples] + [pair.rejected for pair in examples], pad_token_id)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(model, batch)[0].sum()

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_sequences(batch) // 2

    def real_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: Sequence[EncodedPair], batch_size: int, pad_token_id: int,
                 runtime: Runtime) -> dict[str, float]:
        """Mean loss and metrics per pair over ``examples`` (each process scores every world_size-th)."""
        was_training = model.training
        model.eval()
        names: list[str] = []
        totals: Optional[torch.Tensor] = None
        for chunk in evaluation_chunks(examples, batch_size, runtime):
            batch = {k: v.to(runtime.device) for k, v in self.collate(chunk, pad_token_id).items()}
            loss, metrics = self.forward(model, batch)
            names = ["loss", *metrics]
            sums = torch.stack([loss.sum(), *(value.float().sum() for value in metrics.values())]).double().cpu()
            totals = torch.cat([sums, torch.tensor([len(loss)], dtype=torch.float64)]) if totals is None else \
                totals + torch.cat([sums, torch.tensor([len(loss)], dtype=torch.float64)])
        if runtime.distributed:
            totals = totals.to(runtime.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        model.train(was_training)
        return {**{name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}, self.counted: int(totals[-1])}


def evaluation_chunks(examples: Sequence, batch_size: int, runtime: Runtime) -> Iterator[list]:
    """The micro-batches :meth:`PairObjective.evaluate` scores on this process (every world_size-th example)."""
    mine = list(examples[runtime.rank :: runtime.world_size])
    for start in range(0, len(mine), batch_size):
        yield mine[start : start + batch_size]


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2 pairs,) per-sequence values -> chosen (pairs,), rejected (pairs,): batches hold chosen first."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class Reference:
    """The frozen reference of DPO and KTO: the base model, never a trained weight.

    With an adapter method (LoRA, IA3, prompt methods, ...) it is the trained model with its adapter
    switched off, as TRL does, so no second copy is held; otherwise (full and partial fine-tuning)
    a frozen copy of the base, taken before any step. With ``stage.precompute_reference`` its
    log-probabilities are computed once before the first step (:class:`ReferenceTable`).

    Attributes:
        table: Precomputed log-probabilities by sequence, or None (computed on the fly).
        forwards: Reference forward passes made so far (on the fly or precomputing).
    """

    def __init__(self, model: nn.Module, copy: Optional[nn.Module] = None) -> None:
        if copy is not None:
            self.copy = copy
        else:
            self.copy = None if adapter_owner(model) is not None else frozen_copy(model)
        self.table: Optional[ReferenceTable] = None
        self.forwards = 0

    @classmethod
    def model_itself(cls, model: nn.Module) -> "Reference":
        """A reference that is ``model`` as it is (a separately loaded base, or a base model judged against itself)."""
        return cls(model, copy=model.eval())

    def use_packing(self, speed: SpeedSetup) -> None:
        """Give the frozen copy the packed-boundary attention the trained model got (packed batches)."""
        if self.copy is not None and speed.packing:
            enable_packed_attention(self.copy)

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor],
              forward: Callable = reply_logps) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` (summed reply log-probabilities by default) of the reference on ``batch``."""
        self.forwards += 1
        if self.copy is not None:
            return forward(self.copy, batch)
        with adapter_off(unwrap(model)):
            return forward(unwrap(model), batch)


class ReferenceTable:
    """Reference log-probabilities computed once, looked up by each sequence's tokens (ids and labels).

    A reference log-probability is a function of the sequence alone (the reference never trains), so
    a table keyed by the tokens gives the on-the-fly value whatever batch the sequence lands in. It is
    kept in the run folder (``checkpoints/reference-logps.safetensors``) so a resumed run reads it back.
    """

    FILE = "reference-logps.safetensors"

    def __init__(self, values: Optional[dict[bytes, float]] = None) -> None:
        self.values: dict[bytes, float] = dict(values or {})

    @staticmethod
    def key(sequence: EncodedExample) -> bytes:
        tokens = array("q", sequence.input_ids).tobytes() + b"|" + array("q", sequence.labels).tobytes()
        return hashlib.blake2b(tokens, digest_size=16).digest()

    def lookup(self, sequences: Sequence[EncodedExample]) -> Optional[torch.Tensor]:
        """(sequences,) float32 log-probabilities, or None when any is missing (then computed on the fly)."""
        found = [self.values.get(self.key(sequence)) for sequence in sequences]
        return None if any(value is None for value in found) else torch.tensor(found, dtype=torch.float32)

    @classmethod
    def read(cls, path: Path) -> "ReferenceTable":
        from safetensors.torch import load_file

        if not path.is_file():
            return cls()
        state = load_file(str(path))
        keys = [bytes(row) for row in state["keys"].tolist()]
        return cls(dict(zip(keys, state["logps"].tolist())))

    def write(self, path: Path) -> None:
        from safetensors.torch import save_file

        keys = torch.tensor([list(key) for key in self.values], dtype=torch.uint8).reshape(-1, 16)
        logps = torch.tensor(list(self.values.values()), dtype=torch.float32)
        with atomic_path(path) as partial:
            save_file({"keys": keys, "logps": logps}, str(partial))


class ReferenceObjective(PairObjective):
    """What DPO and KTO share: the reference's log-probabilities of a batch, precomputed or on the fly.

    Subclasses say which sequences a micro-batch holds (:meth:`sequences`) and what else it carries
    (:meth:`extras`); with a precomputed table the collated batch carries ``reference_logps`` and no
    reference forward is run.
    """

    def __init__(self, speed: SpeedSetup, config, reference: Reference) -> None:
        super().__init__(speed)
        self.config, self.reference = config, reference
        self.reference_forward = speed.under_autocast(lambda model, batch: reference.logps(model, batch)[0])

    @abstractmethod
    def sequences(self, examples: list) -> list[EncodedExample]:
        """The sequences a micro-batch of ``examples`` is collated from, in batch order."""

    def extras(self, examples: list) -> dict[str, torch.Tensor]:
        return {}

    def collate(self, examples: list, pad_token_id: int) -> dict[str, torch.Tensor]:
        sequences = self.sequences(examples)
        batch = {**self.collate_fn(sequences, pad_token_id), **self.extras(examples)}
        precomputed = self.reference.table.lookup(sequences) if self.reference.table is not None else None
        if precomputed is not None:
            batch["reference_logps"] = precomputed
        return batch

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(sequences,) summed reply log-probabilities of the reference: from the table, else a forward."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        return self.reference.logps(model, batch)[0]

    def before_training(self, model: nn.Module, train_batches: Iterable[list], validation_sets: Sequence[Sequence],
                        eval_batch_size: int, pad_token_id: int, runtime: Runtime, folder: Optional[Path]) -> None:
        """With ``precompute_reference``: the reference's log-probabilities of every sequence training and
        validation will see, computed once (read back from ``folder`` when a resumed run has them)."""
        if not getattr(self.config, "precompute_reference", False):
            return
        suffix = f"-rank{runtime.rank}" if runtime.distributed else ""
        path = folder / ReferenceTable.FILE.replace(".safetensors", f"{suffix}.safetensors") if folder else None
        table = ReferenceTable.read(path) if path is not None else ReferenceTable()
        wanted: dict[bytes, EncodedExample] = {}
        batches = list(train_batches)
        batches += [chunk for examples in validation_sets
                    for chunk in evaluation_chunks(examples, eval_batch_size, runtime)]
        for examples in batches:
            for sequence in self.sequences(examples):
                key = ReferenceTable.key(sequence)
                if key not in table.values:
                    wanted.setdefault(key, sequence)
        missing = list(wanted.items())
        if missing:
            Reporter(runtime.is_main).say(f"precomputing the reference's log-probabilities of {len(missing)} "
                                          "sequences ...")  # once, not once per process
        was_training = model.training
        model.eval()
        for start in range(0, len(missing), eval_batch_size):
            chunk = missing[start : start + eval_batch_size]
            batch = {k: v.to(runtime.device) for k, v in self.collate_fn([s for _, s in chunk], pad_token_id).items()}
            logps = self.reference_forward(model, batch).float().cpu().tolist()
            table.values.update((key, value) for (key, _), value in zip(chunk, logps))
        model.train(was_training)
        if missing and path is not None:
            table.write(path)
        self.reference.table = table


class ReferenceStage(Stage):
    """A stage that compares with the frozen base (dpo, kto): keeps a :class:`Reference` once the method is applied.

    Attributes:
        objective_class: Built as ``objective_class(speed, config, reference)``.
        encode: Encodes the stage's rows (:mod:`tunesmith.data.preference`); ``layout`` names them in errors.
    """

    objective_class: ClassVar[type]
    encode: ClassVar[Callable]
    layout: ClassVar[str]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.reference: Optional[Reference] = None

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        return encode_judged(section, tokenizer, seed, self.kind, self.layout, type(self).encode)

    def after_method(self, model: nn.Module) -> None:
        self.reference = Reference(model)

    def objective(self, speed: SpeedSetup):
        self.reference.use_packing(speed)
        return self.objective_class(speed, self.config, self.reference)


def adapter_owner(model: nn.Module):
    """The peft model that can switch its adapter off, or None for full and partial fine-tuning."""
    from peft import PeftModel

    model = unwrap(model)
    model = getattr(model, "peft_model", model)  # VirtualTokenModel
    return model if isinstance(model, PeftModel) else None


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    with adapter_owner(model).disable_adapter():
        yield


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(unwrap(model))
    reference.requires_grad_(False)
    return reference.eval()
