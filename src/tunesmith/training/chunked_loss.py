"""Losses for the loop's ``loss_fn`` seam that pass packed layouts through and never build the full logits.

The plain loss builds (tokens × vocabulary) logits: 8 × 512 tokens × 32,000 words is 0.5 GB in
float32, and as much again for its gradient. :func:`chunked_loss_sum` instead takes the final
hidden states, keeps only the positions that are scored, and runs the output head and the
cross-entropy chunk by chunk, so one chunk of logits exists at a time; the head also does no
work for masked positions (prompts, padding).

For a plain linear head the chunks are fused (:class:`LinearCrossEntropy`): each chunk's gradient
(softmax minus one-hot) is turned into the gradients of the hidden states and of the head weight
right away, in the forward pass, as Liger-Kernel's fused linear cross-entropy does on GPUs. The
backward pass then only scales them, so the head's product is never recomputed (the checkpointed
fallback for other heads runs it twice). Liger's kernels are Triton (GPU only), hence our own.
Same maths, same gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.training.loss import loss_sum as plain_loss_sum  # the reference the chunked loss must equal
from tunesmith.training.loss import model_inputs

# Vocabulary rows of the head's weight gradient computed by one product (9.4 MB of bfloat16 at SmolLM2's width).
WEIGHT_GRADIENT_ROWS = 8192

__all__ = ["LinearCrossEntropy", "chunked_loss_sum", "model_inputs", "plain_loss_sum", "softmax_rows", "unwrap"]


def chunked_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy without ever holding the logits of more than ``chunk_tokens``.

    The model is called through its own forward (not its decoder alone) so DDP's gradient hooks and
    peft's wrappers see a normal call; ``logits_to_keep`` (an empty tensor of positions) makes that
    forward compute no logits at all, and the last hidden state (after the final norm) feeds the chunks.

    Args:
        model: A causal LM (possibly peft- or DDP-wrapped) whose forward takes ``logits_to_keep``.
        batch: ``input_ids``, ``labels`` and whatever else the model reads.
        chunk_tokens: Scored positions per chunk.

    Returns:
        The summed loss (a float32 scalar).
    """
    input_ids = batch["input_ids"]
    no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    output = model(**model_inputs(batch), use_cache=False, output_hidden_states=True, logits_to_keep=no_positions)
    hidden = output.hidden_states[-1][:, -input_ids.shape[1]:]  # (batch, seq, hidden); virtual tokens dropped
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE_INDEX
    scored_hidden = hidden[:, :-1][scored]  # (targets, hidden)
    targets = labels[scored]  # (targets,)
    head = unwrap(model).get_output_embeddings()
    if type(head) is torch.nn.Linear:  # exactly a plain head: not a LoRA-wrapped or quantised one
        device_type = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
            else head.weight.dtype
        return LinearCrossEntropy.apply(scored_hidden, head.weight, head.bias, targets, chunk_tokens, compute_dtype)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        total = total + checkpoint(_head_cross_entropy_sum, head, scored_hidden[start:start + chunk_tokens],
                                   targets[start:start + chunk_tokens], use_reentrant=False)
    return total


def _head_cross_entropy_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, a chunk of rows at a time.

    The forward pass computes the gradients too (they need the same softmax), keeps them, and the
    backward pass scales them by the incoming gradient: the (rows × vocabulary) logits exist for one
    chunk at a time and the head's product is computed once.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                chunk_tokens: int, compute_dtype: torch.dtype) -> torch.Tensor:
        """Args: hidden (rows, d); weight (vocab, d); bias (vocab,) or None; targets (rows,) class ids.

        The products and the softmax run in ``compute_dtype`` (bfloat16 under autocast, as autocast
        would run them; the softmax accumulates in float32), the loss and the weight-gradient sums
        in float32; gradients come back in each input's own dtype.
        """
        with torch.autocast(hidden.device.type, enabled=False):
            matrix = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] \
                else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, targets.shape[0], chunk_tokens):
                rows = hidden[start:start + chunk_tokens].to(compute_dtype)
                chunk_targets = targets[start:start + chunk_tokens]
                logits = rows @ matrix.T  # (chunk, vocab), in compute_dtype
                if bias is not None:
                    logits = logits + bias.to(compute_dtype)
                largest_logit = logits.amax(-1).float()
                target_logit = logits.gather(1, chunk_targets[:, None]).squeeze(1).float()
                # Softmax in compute_dtype (its kernel accumulates in float32): no float32 copy of the logits,
                # which are not needed after it: on the CPU it is written over them (one (chunk x vocabulary)
                # matrix less at the forward's end, where every activation is held: a full fine-tune's peak).
                probabilities = softmax_rows(logits)
                del logits
                # log-sum-exp = max logit - log(largest probability); that probability is ≥ 1/vocab, so
                # it never underflows, and in bfloat16 it is off by at most 2^-9 relative (0.002 nats).
                log_norm = largest_logit - probabilities.amax(-1).float().log()
                total += (log_norm - target_logit).sum()
                # d(sum of losses)/d(logits) = softmax - one-hot, in place.
                probabilities[torch.arange(chunk_targets.shape[0], device=hidden.device), chunk_targets] -= 1
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk_tokens] = probabilities @ matrix
                if grad_weight is not None:
                    # Added in float32 straight from the compute-dtype product: the same sums as adding its
                    # float32 copy, without the copy (vocabulary x hidden float32, 113 MB on SmolLM2); and a block
                    # of the vocabulary at a time, so the product's temporary is a block's, not the whole
                    # (vocabulary x hidden) matrix (56 MB in bfloat16 on SmolLM2, held at the forward's end, a full
                    # fine-tune's peak). Each row of the product is the same dot products: the same bits (tested).
                    for first in range(0, grad_weight.shape[0], WEIGHT_GRADIENT_ROWS):
                        block = slice(first, first + WEIGHT_GRADIENT_ROWS)
                        grad_weight[block].add_(probabilities[:, block].T @ rows)
                if grad_bias is not None:
                    grad_bias += probabilities.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # The head's weight gradient is scaled in place: it is needed only here, and a scaled copy would hold a
        # second (vocabulary x hidden) float32 matrix, 113 MB on SmolLM2, at the start of the backward pass, where
        # every activation is still held (full fine-tuning's peak). The same product, bit for bit.
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight.mul_(grad_output).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype),
                None, None, None)


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(logits, dim=-1)``, written over ``logits`` on the CPU (the caller gives them up).

    The CPU kernel reads each row's max and sum before it writes the row, element by element, so
    writing over the input gives the same bits (tested in float32 and bfloat16 at the head's sizes);
    other devices get a new tensor, their kernels' order is not checked here.
    """
    if logits.device.type != "cpu":
        return torch.softmax(logits, dim=-1)
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (peft wrappers delegate what we need)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
