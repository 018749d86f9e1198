"""The plan as a table and a few sentences."""

from __future__ import annotations

from tunesmith.workflows.plan.recommendation import Plan, human_seconds


def describe(plan: Plan) -> str:
    """The plan as a table and a few sentences."""
    gb = 2**30
    lines = [f"plan for {plan.model} on {plan.device}: {plan.steps} steps, largest micro-batch {plan.micro_batch_tokens:,} "
             "tokens", "",
             "| method | trainable | of | memory | weights | grads | optimizer | activations | logits | EWC/L2-SP | "
             "process | s/step | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in plan.methods:
        mem = m.memory
        step = f"{m.seconds_per_step:.2f}{'' if m.calibrated else '*'}" if m.seconds_per_step is not None else "n/a"
        run = human_seconds(m.run_seconds) if m.run_seconds is not None else "n/a"
        lines.append(f"| {m.label} | {m.trainable:,} ({100 * m.trainable / m.total:.2f}%) | {m.total:,} | "
                     f"{mem.total / gb:.2f} GB | {mem.weights / gb:.2f} | {mem.gradients / gb:.2f} | "
                     f"{mem.optimizer / gb:.2f} | {mem.activations / gb:.2f} | {mem.logits / gb:.2f} | "
                     f"{mem.regularisers / gb:.2f} | {mem.process / gb:.2f} | {step} | {run} |")
    if any(not m.calibrated and m.seconds_per_step is not None for m in plan.methods):
        lines.append("* scaled from the calibrated method by matrix-product FLOPs")
    for m in plan.methods:
        if m.memory.load_peak:
            lines.append(f"{m.label}: load peak {m.memory.load_peak / gb:.2f} GB (the checkpoint mapped while it is "
                         "quantised: page cache the kernel can drop; docs/plan.md)")
    if plan.available_memory:
        lines.append(f"memory available: {plan.available_memory / gb:.1f} GB")
    lines += ["", f"data: {plan.data['verdict']}", f"recommendation: {plan.recommendation}"]
    lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)
