"""Where a SmolLM2 training step's resident set goes: a timeline by phase, against what each part must hold.

Loads SmolLM2 as the speed benchmark does (float32, its alpaca examples in tunesmith's sampler
order), applies ``train.speed`` (``--speed``, default the defaults) and the method, and runs
``--steps`` optimizer steps as the loop does (forward, backward, clipping, fused AdamW, grads set to
None), while a thread samples the resident set every millisecond. It prints, per step and phase,
the resident set at the phase's start and its highest point during it, next to the bytes that the
parts that cannot be cut hold: float32 weights, their gradients, AdamW's two states, and what autograd
keeps for the backward pass (counted exactly with ``saved_tensors_hooks``; not under ``compile``, whose
graphs such hooks would break).

    python benchmarks/memory_timeline.py --method full
    python benchmarks/memory_timeline.py --method full --speed '{"fused_mlp": false}'

Resident-set figures include the interpreter and libraries (the first line says how much).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import BATCH, LR, smollm2_model_and_examples  # noqa: E402  (after the path is set)

from tunesmith.config import FullMethod, LoraMethod, SpeedSection, TrainSection  # noqa: E402
from tunesmith.methods import build_method  # noqa: E402
from tunesmith.training.speed import apply_speed  # noqa: E402

MB = 2**20


def rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


class Timeline:
    """The resident set's highest point per named phase, sampled by a thread every millisecond."""

    def __init__(self) -> None:
        self.phase, self.rows, self.done = None, [], threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done.is_set():
            if self.rows:
                self.rows[-1][2] = max(self.rows[-1][2], rss_mb())
            time.sleep(0.001)

    def enter(self, name: str) -> None:
        now = rss_mb()
        if self.rows:
            self.rows[-1][2] = max(self.rows[-1][2], now)
        self.rows.append([name, now, now])

    def close(self) -> None:
        self.enter("end")
        self.done.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="full", choices=("lora", "full"))
    parser.add_argument("--speed", default="{}", help="train.speed as JSON (default: its defaults)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    started_mb = rss_mb()
    model, examples, order = smollm2_model_and_examples(args.method, args.steps)
    lora = args.method == "lora"
    method = build_method(LoraMethod(r=16, alpha=32, dropout=0.0, targets="all-linear") if lora else FullMethod())
    model = method.apply(model)
    train = TrainSection(batch_size=BATCH, lr=LR, max_grad_norm=1.0, speed=SpeedSection(**json.loads(args.speed)))
    setup = apply_speed(model, method, train.speed, train, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0, fused=train.speed.fused_optimizer or None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    grads = sum(p.numel() * p.element_size() for p in trainable) / MB
    print(f"SmolLM2 {args.method}; {setup.describe()}")
    print(f"resident before loading: {started_mb:.0f} MB; after loading and preparing: {rss_mb():.0f} MB; "
          f"weights {weights:.0f} MB, their trainable part's gradients {grads:.0f} MB, AdamW states {2 * grads:.0f} MB")
    compiled = "torch.compile" in setup.notes
    timeline, lengths, stamps = Timeline(), [], [time.perf_counter()]
    for step in range(args.steps):
        batch = setup.collate_fn([examples[i] for i in order[step * BATCH:(step + 1) * BATCH]], 0)
        lengths.append(int(batch["attention_mask"].sum()))
        kept: dict[int, int] = {}

        def pack(tensor, kept=kept):
            storage = tensor.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        timeline.enter(f"step {step + 1} forward ({int(batch['attention_mask'].sum())} tokens, "
                       f"{time.perf_counter() - stamps[0]:.0f} s in)")
        if compiled:  # dynamo cannot trace saved-tensor hooks: they would break every compiled layer's graph
            loss = setup.token_loss(model, batch)
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = setup.token_loss(model, batch)
            timeline.rows[-1][0] += f", keeps {sum(kept.values()) / MB:.0f} MB for backward"
        timeline.enter(f"step {step + 1} backward")
        loss.backward()
        del loss
        timeline.enter(f"step {step + 1} clip")
        torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        timeline.enter(f"step {step + 1} optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        if step == 0:
            print("\n| phase | RSS at start (MB) | highest during (MB) |\n|---|---|---|")
        timeline.enter("between steps")  # closes the optimizer's row: a long run's rows print as it goes
        for name, start, high in timeline.rows[-5:-1]:
            print(f"| {name} | {start:.0f} | {high:.0f} |", flush=True)
    timeline.close()
    peaks = [max(high for _, _, high in timeline.rows[5 * step:5 * step + 4]) for step in range(args.steps)]
    longest = max(range(args.steps), key=lambda step: lengths[step])
    print(f"\npeak {max(peaks):.0f} MB at step {peaks.index(max(peaks)) + 1}; the longest step ({lengths[longest]} "
          f"tokens, step {longest + 1}) peaked at {peaks[longest]:.0f} MB; the last five steps' peaks: "
          + ", ".join(f"{peak:.0f}" for peak in peaks[-5:]))
    # A long run's creep: the highest step peak in each tenth of the run, and the speed after the first step.
    tenth = max(1, args.steps // 10)
    print("highest peak per tenth of the run (MB): " + ", ".join(
        f"steps {start + 1}-{min(start + tenth, args.steps)}: {max(peaks[start:start + tenth]):.0f}"
        for start in range(0, args.steps, tenth)))
    if args.steps > 1:
        print(f"tokens/s over steps 2-{args.steps}: {sum(lengths[1:]) / (stamps[-1] - stamps[1]):.0f}")


if __name__ == "__main__":
    main()
