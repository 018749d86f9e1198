"""Peak memory of a ``tunesmith train`` run by phase (docs/plan.md, "QLoRA's whole run").

    PYTHONPATH=src python benchmarks/run_phases.py RECIPE.yaml

Runs ``tunesmith train RECIPE --no-progress`` in a child process whose phases are marked (the plan check, the
load, ``get_peft_model``, the speed levers, the trainer, each step's backward and optimizer step, the save, the
summary: each wrapped to write the time and its own ``RssAnon``/``RssFile``), while this process samples the
child's ``/proc/PID/status`` every 150 ms. Prints, per phase, its seconds and its peak anonymous, mapped-file and
resident memory. The wrappers replace module attributes in the child only, for measuring; nothing of tunesmith
changes. Linux only (``/proc``). On a busy machine the seconds are noise, the memory is not.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_SECONDS = 0.15
PHASES = [("plan check", "check_fits:start", "check_fits:end"),
          ("load", "load_model_and_tokenizer:start", "load_model_and_tokenizer:end"),
          ("method, speed levers", "load_model_and_tokenizer:end", "trainer_init:end"),
          ("steps", "trainer_init:end", "last train_step:end"),
          ("save, summary", "last train_step:end", "exit")]


def status_gb(pid: str = "self") -> dict[str, float]:
    """``RssAnon`` and ``RssFile`` of a process, in GB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon", "RssFile")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 2**20
    return values


def child(recipe: str, marks_path: str) -> int:
    """Train ``recipe`` with the phases marked into ``marks_path``."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    import tunesmith.pipeline.finetune as finetune
    import tunesmith.workflows.plan.check as check
    from tunesmith.cli import main
    from tunesmith.methods.peft_method import PeftMethod
    from tunesmith.training.loop import Trainer

    marks = open(marks_path, "w", buffering=1)

    def mark(name: str) -> None:
        rss = status_gb()
        marks.write(f"{time.time():.3f} {name} {rss['RssAnon']:.3f} {rss['RssFile']:.3f}\n")

    def wrap(owner, attribute: str, label: str) -> None:
        function = getattr(owner, attribute)

        @functools.wraps(function)
        def marked(*args, **kwargs):
            mark(f"{label}:start")
            try:
                return function(*args, **kwargs)
            finally:
                mark(f"{label}:end")
        setattr(owner, attribute, marked)

    for owner, attribute in ((check, "check_fits"), (finetune, "load_model_and_tokenizer"), (finetune, "apply_speed"),
                             (finetune, "save_result"), (finetune, "finish")):
        wrap(owner, attribute, attribute)
    wrap(PeftMethod, "apply", "peft_apply")
    wrap(Trainer, "__post_init__", "trainer_init")
    wrap(Trainer, "train_step", "train_step")
    wrap(torch.Tensor, "backward", "backward")
    register_optimizer_step_pre_hook(lambda *args: mark("optimizer:start"))
    register_optimizer_step_post_hook(lambda *args: mark("optimizer:end"))
    try:
        return main(["train", recipe, "--no-progress"])
    finally:
        mark("exit")


def phase_table(marks: list[tuple[float, str, float, float]], samples: list[tuple[float, float, float]]) -> str:
    """Per phase: seconds, peak anonymous, mapped file and resident (their sum) memory."""
    def when(name: str) -> float:
        if name.startswith("last "):
            return [t for t, n, _, _ in marks if n == name.removeprefix("last ")][-1]
        return next(t for t, n, _, _ in marks if n == name)

    lines = ["| phase | seconds | peak anonymous | peak mapped file | peak resident |", "|---|---|---|---|---|"]
    for label, start, end in PHASES:
        begin, finish = when(start), when(end)
        inside = [s for s in samples if begin <= s[0] <= finish] + [(t, a, f) for t, _, a, f in marks if begin <= t <= finish]
        lines.append(f"| {label} | {finish - begin:.0f} | {max(a for _, a, _ in inside):.2f} GB | "
                     f"{max(f for _, _, f in inside):.2f} GB | {max(a + f for _, a, f in inside):.2f} GB |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3]))
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    marks_path = Path(tempfile.mkdtemp(prefix="run-phases-")) / "marks.txt"
    process = subprocess.Popen([sys.executable, __file__, "--child", sys.argv[1], str(marks_path)], env=os.environ)
    samples = []
    while process.poll() is None:
        try:
            rss = status_gb(str(process.pid))
            samples.append((time.time(), rss["RssAnon"], rss["RssFile"]))
        except (FileNotFoundError, KeyError, ProcessLookupError):  # exited between the poll and the read
            break
        time.sleep(SAMPLE_SECONDS)
    if process.wait() != 0:
        sys.exit(f"tunesmith train exited with {process.returncode}")
    marks = [(float(t), name, float(a), float(f)) for t, name, a, f in
             (line.split() for line in marks_path.read_text().splitlines())]
    print(phase_table(marks, samples))


if __name__ == "__main__":
    main()
