"""``tunesmith reproduce RUN``: run a finished run again from its folder alone and compare the two.

The new run reads the old one's resolved recipe (``config.yaml``) from the folder the old run was started
in (recipe paths are relative to it), after checking that every data file still has the digest recorded in
``provenance.json``. Its result is compared tensor by tensor with the old one: bit-identical, or the largest
difference, with the loss curves side by side and what differs in the circumstances (packages, threads,
processes, machine), since floating-point sums need not agree across those.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from tunesmith.config import load_recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import write_text_atomic
from tunesmith.core.run_files import RunLayout
from tunesmith.pipeline.finetune import finetune
from tunesmith.pipeline.provenance import check_data_unchanged, differences, read_provenance

REPORT_FILE = "reproduce.json"


@dataclass
class Reproduction:
    """How a reproduced run compares with the original.

    Attributes:
        bit_identical: Every tensor of the result is equal, bit for bit (and the same tensors exist).
        max_weight_difference: The largest absolute difference over every weight of the result.
        tensors: How many tensors were compared.
        loss_curve: ``(step, original loss, reproduced loss)`` for every logged training step.
        max_loss_difference: The largest absolute difference between the two loss curves.
        changed: What differs in the circumstances, ``name -> (original, reproduced)``.
    """

    original: str
    reproduced: str
    bit_identical: bool
    max_weight_difference: float
    tensors: int
    loss_curve: list[tuple[int, Optional[float], Optional[float]]]
    max_loss_difference: float
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    data_verified: bool = True

    def describe(self) -> str:
        verdict = ("bit-identical: every one of the {n} tensors of the result is equal" if self.bit_identical else
                   "not bit-identical: the largest weight difference over {n} tensors is {d:.3g}")
        lines = [f"reproduced {self.original} as {self.reproduced}",
                 verdict.format(n=self.tensors, d=self.max_weight_difference),
                 f"loss curves: largest difference {self.max_loss_difference:.3g} over {len(self.loss_curve)} steps"]
        lines += ["  step  original    reproduced"]
        lines += [f"  {step:>4}  {_number(a):<10}  {_number(b)}" for step, a, b in self.loss_curve]
        if self.changed:
            lines.append("what differs (floating-point results need not agree across these): " + "; ".join(
                f"{name} {before} -> {after}" for name, (before, after) in self.changed.items()))
        if not self.data_verified:
            lines.append("the original run recorded no provenance.json: its data files could not be verified")
        return "\n".join(lines)


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.6f}"


def reproduce(run: str | Path, out: Optional[str | Path] = None, progress: bool = True) -> Reproduction:
    """Train ``run``'s recipe again into ``out`` (default: ``RUN-reproduced``) and compare the results.

    Raises:
        TunesmithError: When ``run`` is not a finished run, ``out`` exists, or a data file changed.
    """
    run = Path(run).resolve()
    layout = RunLayout(run)
    if not layout.config.is_file() or not layout.summary.is_file():
        raise TunesmithError(f"{run} is not a finished tunesmith run (it needs config.yaml and summary.json); give the "
                             "output folder of a run that finished")
    out = Path(out).resolve() if out is not None else run.with_name(run.name + "-reproduced")
    if out.exists():
        raise TunesmithError(f"{out} already exists; choose another --out (reproduce never writes into a folder it "
                             "did not create)")
    original = read_provenance(run)
    if original is not None:
        check_data_unchanged(original)
    with started_in(Path(original["cwd"]) if original is not None else Path.cwd()):
        recipe = load_recipe(layout.config, [f"output.dir={out}", "output.overwrite=false"])
        finetune(recipe, progress=progress)
    again = read_provenance(out) or {}
    result = check_reproduction(run, out, differences(original or {}, again), original is not None)
    write_text_atomic(out / REPORT_FILE, json.dumps(asdict(result), indent=2) + "\n")
    return result


@contextlib.contextmanager
def started_in(folder: Path) -> Iterator[None]:
    """Run the body from ``folder`` (the recipe's relative paths mean what they meant to the original run)."""
    if not folder.is_dir():
        raise TunesmithError(f"the folder the run was started from, {folder}, is gone; its recipe's relative paths "
                             "cannot be resolved")
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def check_reproduction(original: Path, reproduced: Path, changed: dict, data_verified: bool) -> Reproduction:
    """Compare two finished runs' results tensor by tensor and their logged loss curves."""
    identical, largest, count = diff_results(result_folder(original), result_folder(reproduced))
    first, second = losses(original), losses(reproduced)
    curve = [(step, first.get(step), second.get(step)) for step in sorted(set(first) | set(second))]
    gaps = [abs(a - b) for _, a, b in curve if a is not None and b is not None]
    missing = any(a is None or b is None for _, a, b in curve)
    return Reproduction(str(original), str(reproduced), identical, largest, count, curve,
                        float("inf") if missing else max(gaps, default=0.0), changed, data_verified)


def result_folder(run: Path) -> Path:
    found = RunLayout(run).saved_result()
    if found is None:
        raise TunesmithError(f"{run} holds no adapter/ or model/ folder to compare")
    return found


def diff_results(first: Path, second: Path) -> tuple[bool, float, int]:
    """(bit-identical, largest absolute difference, tensors compared) over every ``*.safetensors`` file."""
    import torch
    from safetensors.torch import load_file

    names = sorted(path.name for path in first.glob("*.safetensors"))
    if names != sorted(path.name for path in second.glob("*.safetensors")):
        return False, float("inf"), 0
    identical, largest, count = True, 0.0, 0
    for name in names:
        a, b = load_file(first / name), load_file(second / name)
        if a.keys() != b.keys():
            return False, float("inf"), count
        for key in a:
            count += 1
            if a[key].shape != b[key].shape or a[key].dtype != b[key].dtype:
                return False, float("inf"), count
            identical &= torch.equal(a[key], b[key])
            largest = max(largest, (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0)
    return identical, largest, count


def losses(run: Path) -> dict[int, float]:
    """Training loss by step, from ``metrics.jsonl``."""
    return {record["step"]: record["loss"] for record in RunLayout(run).read_metrics() if "loss" in record}
