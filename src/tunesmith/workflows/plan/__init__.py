"""``tunesmith plan``: before training, what each method costs here, and which to use.

For the recipe's method (or every method) the plan gives the parameters and trainable share,
peak memory broken down, the time per step and for the run, the data verdict, and a
recommendation with its reasons. Where the numbers come from:

- parameters: the method applied to the model built on the ``meta`` device (no weights allocated);
- weights, gradients, optimizer state (AdamW: two float32 moments), EWC/L2-SP copies: counted
  from those parameters;
- activations: the bytes autograd saves in one real forward pass of a short micro-batch, through
  the same speed seams training uses (packing, chunked loss, autocast, checkpointing), measured
  with ``torch.autograd.graph.saved_tensors_hooks`` and scaled to the run's largest micro-batch;
- the process's own footprint (interpreter, torch, transformers) measured in this process;
- time per step: a short calibration run of the recipe (a few timed steps in a subprocess, cached),
  as seconds per computed token (padding included), times the mean tokens of the run's own steps
  (drawn as the sampler draws them); scaled to other methods by their matrix-product FLOPs;
- time for the run: the steps, plus what a run does besides steps, timed in the same calibration:
  the start (imports, model load, data preparation, the final save), the first step's warm-up, and
  every validation pass (forward passes over the validation set, at the forward's share of a step's FLOPs).

Measured against real runs in docs/plan.md.

The package, by concept: :mod:`.memory` (peak memory by part), :mod:`.timing` (steps, calibration, FLOPs
scaling), :mod:`.recommendation` (each method's plan and the choice), :mod:`.report` (the printed table),
:mod:`.shapes` (a plan from a model's shape alone, before anything loads), :mod:`.check` (train's refusal before
loading and ``activation_checkpointing: auto``, by the shape plan).
"""

from tunesmith.workflows.plan.memory import (
                                   ALLOCATOR_OVERHEAD,
                                   INT8_BYTES_PER_WEIGHT,
                                   NF4_BYTES_PER_WEIGHT,
                                   PROBE_TOKENS,
                                   Memory,
                                   activation_bytes,
                                   meta_parameter_counts,
                                   quantisable_weight_count,
                                   training_process_bytes,
                                   weight_bytes,
)
from tunesmith.workflows.plan.recommendation import (
                                   MethodPlan,
                                   Plan,
                                   human_seconds,
                                   method_label,
                                   plan_recipe,
                                   recommend,
)
from tunesmith.workflows.plan.report import describe
from tunesmith.workflows.plan.timing import (
                                   CALIBRATION_STEPS,
                                   calibrate_time,
                                   calibration_key,
                                   largest_micro_batch_tokens,
                                   matmul_flops_per_token,
                                   run_steps,
                                   step_costs,
)

__all__ = ["ALLOCATOR_OVERHEAD", "CALIBRATION_STEPS", "INT8_BYTES_PER_WEIGHT", "NF4_BYTES_PER_WEIGHT", "PROBE_TOKENS",
           "Memory", "MethodPlan", "Plan", "activation_bytes", "calibrate_time", "calibration_key", "describe",
           "human_seconds", "largest_micro_batch_tokens", "matmul_flops_per_token", "meta_parameter_counts",
           "method_label", "plan_recipe", "quantisable_weight_count", "recommend", "run_steps", "step_costs",
           "training_process_bytes", "weight_bytes"]
