"""The fused training ops on and off, interleaved in one process: step time and bytes kept for backward.

On a busy machine separate runs differ by more than these levers do, so this script loads SmolLM2
once, applies ``train.speed`` with the levers off, and then alternates forward+backward steps on one
fixed packed micro-batch with the fused levers (RMSNorm, LoRA's addmm, SiLU·up; ``--levers``) swapped
in (``on``) and out (``off``), several rounds, reporting the median of on/off step-time ratios. It also counts the
bytes autograd keeps for the backward pass (``saved_tensors_hooks``), which is deterministic and
so exact on any machine, and the optimizer step's time and resident-set growth with the fused and
the default (``foreach``) AdamW.

    python benchmarks/fused_ab.py --method lora --rounds 6
    python benchmarks/fused_ab.py --method full --rounds 4
    python benchmarks/fused_ab.py --method lora --levers mlp   # one lever against the others on
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import BATCH, smollm2_model_and_examples  # noqa: E402  (after the path is set)

from tunesmith.config import FullMethod, LoraMethod, SpeedSection, TrainSection  # noqa: E402
from tunesmith.methods import build_method  # noqa: E402
from tunesmith.training.fused_mlp import fuse_gated_mlps  # noqa: E402
from tunesmith.training.fused_norm import fuse_rms_norms  # noqa: E402
from tunesmith.training.speed import apply_speed  # noqa: E402

LEVERS = ("norm", "lora", "mlp")  # train.speed.fused_<lever>


def saved_bytes(step) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``step()``'s forward."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step(backward=False)
    loss.backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--levers", default=",".join(LEVERS),
                        help="comma-separated fused levers swapped in and out (the others stay on): "
                        + ", ".join(LEVERS))
    parser.add_argument("--batch", type=int, default=2, help="which step's micro-batch (of the sampler's order)")
    args = parser.parse_args()
    levers = [lever for lever in args.levers.split(",") if lever]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        parser.error(f"--levers: unknown {sorted(unknown)}; choose from {', '.join(LEVERS)}")
    model, examples, order = smollm2_model_and_examples(args.method, args.batch + 1)
    lora = args.method == "lora"
    method = build_method(LoraMethod(r=16, alpha=32, dropout=0.0, targets="all-linear") if lora else FullMethod())
    model = method.apply(model)
    train = TrainSection(batch_size=BATCH, speed=SpeedSection(**{f"fused_{lever}": False for lever in levers}))
    setup = apply_speed(model, method, train.speed, train, torch.device("cpu"))
    batch = setup.collate_fn([examples[i] for i in order[args.batch * BATCH:(args.batch + 1) * BATCH]], 0)
    tokens = int(batch["attention_mask"].sum())
    print(f"SmolLM2 {args.method}, one packed micro-batch of {tokens} tokens; {setup.describe()}; "
          f"load average {__import__('os').getloadavg()[0]:.1f}", flush=True)

    def step(backward: bool = True):
        loss = setup.token_loss(model, batch)
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)
        return loss

    def swapped_in():
        base = method.base_model(model)
        swaps = {"norm": lambda: fuse_rms_norms(base), "lora": lambda: method.fuse_for_training(model),
                 "mlp": lambda: fuse_gated_mlps(base)}
        restores = [swaps[lever]()[1] for lever in levers]
        return lambda: [restore() for restore in restores]

    def timed() -> float:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    step()  # warm-up
    off_bytes = saved_bytes(step)
    restore = swapped_in()
    on_bytes = saved_bytes(step)
    restore()
    print(f"kept for backward: off {off_bytes / 2**20:.0f} MB, on {on_bytes / 2**20:.0f} MB "
          f"({on_bytes / off_bytes:.2f}×)", flush=True)
    ratios = []
    for round_ in range(args.rounds):
        off = timed()
        restore = swapped_in()
        on = timed()
        restore()
        ratios.append(off / on)
        print(f"round {round_ + 1}: off {off:.2f} s, on {on:.2f} s, speed on/off {off / on:.2f}×", flush=True)
    print(f"fused {' + '.join(levers)}: median speed on/off {statistics.median(ratios):.2f}× "
          f"over {args.rounds} rounds")
    optimizer_ab(model, step, args.rounds)


def optimizer_ab(model, step, rounds: int) -> None:
    """AdamW's step, fused against foreach, alternating: seconds and the resident set's rise during the step.

    The rise is sampled every millisecond by a thread reading ``/proc/self/status`` (each optimizer's
    states already exist: one warm-up step each first).
    """
    import threading

    def rss_mb() -> float:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

    def rise_during(call) -> tuple[float, float]:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before, highest, done = rss_mb(), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                highest[0] = max(highest[0], rss_mb())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        call()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        return seconds, max(0.0, highest[0] - before)

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizers = {name: torch.optim.AdamW(parameters, lr=1e-9, **kw)
                  for name, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    loss = step(backward=False)
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
    results = {name: [rise_during(optimizer.step) for _ in range(rounds)] for name, optimizer in optimizers.items()}
    for name, runs in results.items():
        print(f"AdamW {name}: step {statistics.median(s for s, _ in runs):.2f} s, "
              f"resident set rises by up to {max(r for _, r in runs):.0f} MB during the step")


if __name__ == "__main__":
    main()
