"""A compiled single-row decode step on fixed shapes: the lean step, once through ``torch.compile``.

At batch 1 a decode step of a 30-layer model on a CPU is mostly per-operation dispatch, not matmuls:
about 400 small kernels, each a trip through Python, the dispatcher and an OpenMP region. Compiled
(as gpt-fast does on GPUs), the step becomes a few fused C++ kernels around the matmuls. Compiling
needs shapes that do not change from step to step, so the step attends to the whole slot of the
cache (its capacity, a power of two) with a mask that hides the positions not yet written, instead
of to the filled part, and writes the new key and value in place with ``index_copy_``.

One compiled step is kept per model (an attribute of the model) and recompiled per cache capacity (``dynamic=False``; the slot
cache grows by doubling, so capacities are powers of two). Compiling costs minutes of CPU time on a
busy two-core machine (less with inductor's on-disk cache warm), so it is asked for, not automatic:
``decode(..., compile=True)``, ``tunesmith generate --compile``. A compile that fails prints one
line on stderr and the row goes on with the lean step.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

import torch

# decoding imports this module, so its types (LeanDecoder, SlotCache) are named in the docstrings only
LeanStep = Callable[..., torch.Tensor]


class _StaticView:
    """What the lean step's attention sees of slot 0: the new key/value written in place at ``position``,
    the whole capacity read back (the mask hides what lies past the row's new token)."""

    def __init__(self, cache: Any, position: torch.Tensor) -> None:
        self.cache, self.position = cache, position  # position: (1,) the new token's place in the slot

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[:1].index_copy_(2, self.position, key.to(keys.dtype))
        values[:1].index_copy_(2, self.position, value.to(values.dtype))
        return keys[:1], values[:1]


class CompiledStep:
    """The lean decode step of one row (slot 0 of a :class:`SlotCache`), compiled for fixed shapes.

    Call it as the lean step is called; it returns None where it cannot run (a compile that failed, a batch
    of more than one row) and the caller takes the lean step instead.
    """

    def __init__(self, lean: LeanStep, mode: str = "default") -> None:
        self.lean, self.mode, self.failed = lean, mode, False
        self.compile_seconds = 0.0  # spent in the calls that compiled (first call per capacity)
        self._capacities: set[int] = set()
        self._step = torch.compile(self._eager, dynamic=False, fullgraph=True,
                                   mode=None if mode == "default" else mode)

    def _eager(self, ids: torch.Tensor, position: torch.Tensor, cache: Any) -> torch.Tensor:
        keys = torch.arange(cache.capacity, device=ids.device)
        mask = (keys <= position)[None, None, None, :]  # (1, 1, 1, capacity)
        return self.lean(ids, position[None, :], mask, _StaticView(cache, position))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: Any) -> Optional[torch.Tensor]:
        """Logits (1, 1, vocabulary) of row 0's next token, or None (the caller steps the lean way)."""
        if self.failed or ids.shape[0] != 1:
            return None
        position = torch.tensor([cache.lengths[0]], device=ids.device)
        first = cache.capacity not in self._capacities
        started = time.perf_counter()
        try:
            logits = self._step(ids, position, cache)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the lean step
            self.failed = True
            print(f"tunesmith: torch.compile of the decode step failed, decoding without it "
                  f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})",
                  file=sys.stderr)
            return None
        if first:
            self._capacities.add(cache.capacity)
            self.compile_seconds += time.perf_counter() - started
        return logits


ATTRIBUTE = "_tunesmith_compiled_step"  # where a model keeps its compiled step (a cycle the GC collects with it)


def compiled_step(model, lean: Optional[LeanStep]) -> Optional[CompiledStep]:
    """The compiled single-row step of ``model``, made once per model (its compiled code is cached per
    capacity), or None where the lean step does not fit the model (``lean`` is None)."""
    if lean is None:
        return None
    if getattr(model, ATTRIBUTE, None) is None:
        setattr(model, ATTRIBUTE, CompiledStep(lean))
    return getattr(model, ATTRIBUTE)
