"""Loss and perplexity of a model on encoded examples (sharded over processes).

The validation metric of token-level stages; evaluation suites call it too.
"""

from __future__ import annotations

import math

import torch

from tunesmith.data.encode import EncodedExample
from tunesmith.runtime import Runtime
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
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(runtime.device) for k, v in collate(mine[start : start + batch_size], pad_token_id).items()}
        totals[0] += float(loss_sum(model, batch))
        totals[1] += count_target_tokens(batch)
    if runtime.distributed:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss = float(totals[0] / totals[1])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1])}
