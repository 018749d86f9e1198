"""Things that watch the loop without being woven into it: progress bar, metrics file (trackers: trackers.py).

A hook receives every logged record (training steps and evaluations) as a flat dictionary. Only
the main process gets hooks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


class Hook:
    """Base hook: every method is optional."""

    def on_train_start(self, total_steps: int, start_step: int) -> None: ...

    def on_step(self, record: dict[str, Any]) -> None:
        """Called after every optimizer step with at least step, loss, lr, tokens_per_s."""

    def on_log(self, record: dict[str, Any]) -> None:
        """Called for records worth keeping (every ``log_every`` steps, every evaluation)."""

    def on_train_end(self) -> None: ...

    def wants_stop(self) -> bool:
        """Asked after every step: True ends training there, as early stopping does (a checkpoint, then the
        result and summary as for any finished run), e.g. a sweep's pruner."""
        return False


class ProgressBar(Hook):
    """A tqdm bar with loss, learning rate, tokens/s and ETA."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def on_step(self, record: dict[str, Any]) -> None:
        reward = {"reward": f"{record['reward']:.3f}"} if "reward" in record else {}  # online RL
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", **reward, lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def on_log(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            shown = [f"{key} {value:.4f}" for key, value in record.items()
                     if key.startswith("val_") and "/" not in key and isinstance(value, float)]
            self.bar.write(f"step {record['step']}: " + ", ".join(shown))
        for sample in record.get("samples", ()):  # online RL: a completion and its reward
            self.bar.write(f"step {record['step']}: reward {sample['reward']:+.3f} <- {sample['completion'][:120]!r}")

    def on_train_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsFile(Hook):
    """``metrics.jsonl``: one JSON object per logged step and evaluation."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        if start_step and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: it will be logged again. A line
            # that does not parse was torn by a process killed while appending it: drop it too.
            records = [_parse(line) for line in self.path.read_text(errors="replace").splitlines()]
            kept = [json.dumps(r) for r in records if isinstance(r, dict) and r.get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _parse(line: str) -> Optional[Any]:
    try:
        return json.loads(line)
    except ValueError:
        return None
