"""Stopping well: SIGTERM or Ctrl-C finish the step and checkpoint; a non-finite loss stops the run.

Schedulers and ``kill`` send SIGTERM; the loop treats it like Ctrl-C: the current optimizer step
completes, a checkpoint is written and the resume command is printed. A second Ctrl-C interrupts at
once. A loss or gradient norm that is NaN or infinite stops the run before the optimizer applies
it, so no weight is poisoned and no result is saved.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

from tunesmith.core.errors import TunesmithError
from tunesmith.training.checkpoint import last_complete_checkpoint


class NonFiniteLoss(TunesmithError):
    """The loss or the gradient norm of a step is NaN or infinite."""


class StopRequest:
    """While active, SIGTERM and a first Ctrl-C set :attr:`signal_name` instead of killing the process."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        self.signal_name = signal.Signals(number).name
        if number == signal.SIGINT:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def check_finite(step: int, loss: float, grad_norm: float, lr: float, checkpoint_dir: Optional[Path],
                 sources: Callable[[], Sequence[str]]) -> None:
    """Raise when the loss or gradient norm of step ``step`` (1-based) is not a finite number.

    Args:
        checkpoint_dir: The run's checkpoints, to say which one is kept.
        sources: Where the batch's examples come from (``file, line N``), named in the message.

    Raises:
        NonFiniteLoss: Naming the step, the batch's records and the fix.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    named = list(dict.fromkeys(s for s in sources() if s))
    shown = "; ".join(named[:8]) + (f"; and {len(named) - 8} more" if len(named) > 8 else "")
    batch = f" on the batch of {shown}" if shown else ""
    raise NonFiniteLoss(
        f"training stopped at step {step}: the loss is {loss} and the gradient norm {grad_norm}{batch}; "
        f"lower train.lr (now {lr:g}) or check those records; no result was saved and "
        f"{last_complete_checkpoint(checkpoint_dir)}"
    )
