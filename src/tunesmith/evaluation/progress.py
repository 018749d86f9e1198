"""Progress of a long evaluation: a tqdm bar per task with items done, items/s and ETA.

tqdm writes to stderr and honours its own ``TQDM_DISABLE=1``; the callback it yields is what the
scorers call with the number of items finished, so a studio can pass its own callback instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def item_progress(name: str, total: int, unit: str = "item") -> Iterator[Callable[[int], None]]:
    """A bar named ``name`` over ``total`` items; yields ``advance(finished_items)``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=name, unit=unit, dynamic_ncols=True, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
