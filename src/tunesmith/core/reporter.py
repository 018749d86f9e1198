"""The run's one voice: messages from the main process only, progress bars on or off.

A run used to thread a ``say`` callable through its signatures beside bare ``print`` calls (some of
which printed once per process). :class:`Reporter` is built once per run, from the runtime's rank,
and handed along inside the run's context.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Reporter:
    """Where a run's messages go.

    Attributes:
        is_main: Only the main process speaks (every process runs the same steps).
        progress: Show progress bars (``--no-progress`` turns them off).
    """

    is_main: bool = True
    progress: bool = True

    def say(self, *parts, **options) -> None:
        """Print a line on the main process (flushed: runs are often piped)."""
        if self.is_main:
            print(*parts, flush=True, **options)

    def warn(self, message: str) -> None:
        """A warning on standard error, from the main process."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def __call__(self, *parts, **options) -> None:
        self.say(*parts, **options)


QUIET = Reporter(is_main=False, progress=False)
