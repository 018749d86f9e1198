"""Where a full fine-tuning step on SmolLM2 goes, tunesmith's and the reference's, and what bounds their ratio.

    python benchmarks/full_step_bound.py --stack tunesmith --speed '{"compile": true}'
    python benchmarks/full_step_bound.py --stack reference     # Trainer's step: bf16 autocast + flattening

Times each phase of ``--steps`` steps after ``--warmup`` (forward, backward, gradient norm + clip + AdamW,
zeroing) with the clock, then profiles ``--profile-steps`` more (torch.profiler, self CPU time, shapes recorded)
and sorts every op into the head's products, the other weight-gradient products (inner dimension = tokens), the
other products (forward and input-gradient), attention, the optimizer, the embedding's gradient, casts and copies,
compiled kernels (inductor's fused elementwise code, seen as its caller's self time) and the rest. Prints JSON.
The reference's step is the one ``transformers.Trainer`` runs with ``bf16=True``: float32 weights, autocast,
``DataCollatorWithFlattening``, loss from the model, ``clip_grad_norm_``, fused AdamW (its default optimizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed as bench  # noqa: E402  (benchmarks/speed.py: the same model, examples and order)

VOCAB = 49152


def tunesmith_step(speed: dict, steps: int):
    from tunesmith.config import FullMethod, SpeedSection, TrainSection
    from tunesmith.methods import build_method
    from tunesmith.training.schedule import build_optimizer, clip_and_step
    from tunesmith.training.speed import apply_speed

    model, examples, order = bench.smollm2_model_and_examples("full", steps)
    method = build_method(FullMethod())
    model = method.apply(model)
    train = TrainSection(batch_size=bench.BATCH, lr=bench.LR, weight_decay=0.0, max_grad_norm=1.0,
                         speed=SpeedSection(**speed))
    setup = apply_speed(model, method, train.speed, train, torch.device("cpu"))
    optimizer = build_optimizer(model, train)
    print(setup.describe(), file=sys.stderr)

    def batch_of(index):
        return setup.collate_fn([examples[i] for i in order[index * bench.BATCH:(index + 1) * bench.BATCH]], 0)

    def forward(batch):
        return setup.token_loss(model, batch) / int((batch["labels"] != -100).sum())

    def optimize():
        parameters = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        clip_and_step(optimizer, parameters, 1.0, norm)

    return model, optimizer, batch_of, forward, optimize


def reference_step(steps: int):
    from transformers import DataCollatorWithFlattening

    model, examples, order = bench.smollm2_model_and_examples("full", steps)
    model.config.use_cache = False
    model.train()
    flatten = DataCollatorWithFlattening()
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.LR, weight_decay=0.0, fused=True)

    def batch_of(index):
        chosen = [examples[i] for i in order[index * bench.BATCH:(index + 1) * bench.BATCH]]
        return flatten([{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in chosen])

    def forward(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    def optimize():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return model, optimizer, batch_of, forward, optimize


def category(event, tokens: set[int]) -> str:
    name = event.key
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul") and event.input_shapes:
        shapes = [s for s in event.input_shapes if len(s) in (2, 3)]
        if any(VOCAB in s or 8192 in s for s in shapes):  # the fused head works 8,192 vocabulary rows at a time
            return "matmul: head (forward, both gradients)"
        if name == "aten::bmm":
            return "attention (its backward's products)"
        first = shapes[1] if name == "aten::addmm" and len(shapes) > 2 else shapes[0]  # addmm(bias, a, b)
        if first[-1] in tokens:  # (out, tokens) @ (tokens, in): a weight's gradient
            return "matmul: weight gradients"
        return "matmul: forward + input gradients"
    if name.startswith("aten::") and ("mm" in name.split("::")[1][:3] or "linear" in name):
        return "matmul: forward + input gradients"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "adam" in name.lower():
        return "optimizer (fused AdamW)"
    if "embedding" in name or "index_add" in name or "index_put" in name:
        return "embedding gradient"
    if name in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"):
        return "casts and copies"
    if name.startswith("## Call CompiledFxGraph"):  # inductor's own kernels: the range's self time
        return "compiled kernels (inductor elementwise)"
    if "Compiled" in name or "Inductor" in name or "graph" in name.lower() or "inductor" in name.lower():
        return "compiled kernels (inductor elementwise)"
    if name in ("aten::_softmax", "aten::amax", "aten::_log_softmax", "aten::_log_softmax_backward_data",
                "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::_softmax_backward_data"):
        return "loss softmax"
    if name in ("aten::zero_", "aten::fill_", "aten::zeros", "aten::zeros_like", "aten::empty"):
        return "fills and allocations"
    if name in ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::stack", "aten::_foreach_mul_",
                "aten::clamp", "aten::reciprocal"):
        return "gradient norm and clip"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=("tunesmith", "reference"), default="tunesmith")
    parser.add_argument("--speed", default='{"compile": true}')
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's); 1 is robust to load")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps + args.profile_steps
    model, optimizer, batch_of, forward, optimize = (
        tunesmith_step(json.loads(args.speed), total) if args.stack == "tunesmith" else reference_step(total))
    phases = {"forward": 0.0, "backward": 0.0, "norm, clip, AdamW": 0.0, "zero_grad": 0.0}
    cpu_phases = dict.fromkeys(phases, 0.0)  # process CPU time: the work, not the waits for a busy core
    real_tokens, timed_tokens = set(), 0

    def step(index, timed):
        nonlocal timed_tokens
        batch = batch_of(index)
        count = int(batch["input_ids"].numel())
        real_tokens.update({count, count - 1})
        stamps, cpu = [time.perf_counter()], [time.process_time()]
        with torch.profiler.record_function("phase: forward"):
            loss = forward(batch)
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        with torch.profiler.record_function("phase: backward"):
            loss.backward()
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        with torch.profiler.record_function("phase: optimizer"):
            optimize()
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if timed:
            timed_tokens += count
            for name, a, b, c, e in zip(phases, stamps, stamps[1:], cpu, cpu[1:]):
                phases[name] += b - a
                cpu_phases[name] += e - c

    for index in range(args.warmup):
        step(index, False)
    for index in range(args.warmup, args.warmup + args.steps):
        step(index, True)
    seconds = sum(phases.values())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for index in range(args.warmup + args.steps, total):
            step(index, False)
    phase_shares: dict[str, dict[str, float]] = {}
    detail: dict[str, float] = {}
    profiled = 0.0
    for event in profiler.events():
        if event.key.startswith("phase: ") or event.self_cpu_time_total <= 0:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.key.startswith("phase: "):
            parent = parent.cpu_parent
        phase = parent.key[7:] if parent is not None else "zero_grad and between"
        group = category(event, real_tokens)
        phase_shares.setdefault(phase, {})
        phase_shares[phase][group] = phase_shares[phase].get(group, 0.0) + event.self_cpu_time_total
        profiled += event.self_cpu_time_total
        if not group.startswith("matmul"):
            key = f"{phase} {event.key} {event.input_shapes}"[:160]
            detail[key] = detail.get(key, 0.0) + event.self_cpu_time_total
    shares = {phase: {k: round(v / profiled, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
              for phase, groups in phase_shares.items()}
    top = [(k, round(v / profiled, 4)) for k, v in sorted(detail.items(), key=lambda kv: -kv[1])[:40]]
    print(json.dumps({"stack": args.stack, "tokens_per_s": timed_tokens / seconds,
                      "seconds_per_step": seconds / args.steps,
                      "cpu_tokens_per_s": timed_tokens / sum(cpu_phases.values()), "threads": torch.get_num_threads(),
                      "phases_s_per_step": {k: v / args.steps for k, v in phases.items()},
                      "phases_cpu_s_per_step": {k: v / args.steps for k, v in cpu_phases.items()},
                      "shares": shares, "top_non_matmul_ops": top}, indent=1))


if __name__ == "__main__":
    main()
