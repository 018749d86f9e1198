"""Loss and perplexity of a model on encoded examples (sharded over processes).

The validation metric of token-level stages; evaluation suites call it too.
"""

from __future__ import annotations

import math

import torch

from tunesmith.core.runtime import Runtime
from tunesmith.data.encode import EncodedExample
from tunesmith.training.batching import collate
from tunesmith.training.loss import count_target_tokens, loss_sum


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, examples: list[EncodedExample], batch_size: int,
                  pad_token_id: int, runtime: Runtime) -> dict[str, float]:
    """Mean loss per target token and its perplexity over ``examples``.

    Each process scores every ``world_size``-th example; the sums are added over processes.

    Returns:
        ``{"loss": ..., "perplexity": ..., "tokens": ...}``.
    """
    was_training = model.training
    model.eval()
    mine = examples[runtime.rank :: runtime.world_size]
    totals = torch.zeros(2, dtype=torch.float64)
    # Every process runs the same number of forward passes: a sharded (FSDP) model gathers its weights in
    # each one, with every process. A process that has run out scores its first example again, uncounted.
    passes = math.ceil(math.ceil(len(examples) / runtime.world_size) / batch_size)
    for start in range(0, passes * batch_size, batch_size):
        chunk = mine[start : start + batch_size]
        batch = {k: v.to(runtime.device) for k, v in collate(chunk or mine[:1] or examples[:1], pad_token_id).items()}
        summed = float(loss_sum(model, batch))
        if chunk:
            totals[0] += summed
            totals[1] += count_target_tokens(batch)
    if runtime.distributed:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss = float(totals[0] / totals[1])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1])}
