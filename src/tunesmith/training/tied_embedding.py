"""A tied input embedding's gradient added as its token rows into the head's, not as a dense (vocabulary × width) matrix.

With tied embeddings (SmolLM2, Llama 3.2 1B, Qwen2.5 0.5B, Gemma) one weight is both the input embedding and the
output head, and a full fine-tune's gradient of it has two parts: the head's, dense (every vocabulary row gets
softmax mass), and the embedding's, non-zero only in the rows of the batch's tokens. torch's dense embedding
backward builds that second part as a zero-filled (vocabulary × width) float32 matrix (113 MB on SmolLM2), adds
the token rows into it, and the autograd engine then adds the whole matrix to the head's part: three passes over
113 MB for about 2,000 rows a step. With ``sparse=True`` (torch's own switch on ``nn.Embedding``) the embedding's
part is the token rows alone and the engine adds them into the head's dense gradient in place: the sum is the
same, in another order (equal to float rounding, tested), and the parameter's gradient stays dense.

Only where the optimizer can still see a dense gradient: a gradient left sparse (a loss that never reached the
head) is made dense after accumulation, since torch's fused AdamW refuses sparse ones; and one process only
(DistributedDataParallel builds sparse buckets for a sparse embedding's parameter).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def sparse_tied_embedding_gradient(base: nn.Module) -> Optional[Callable[[], None]]:
    """Switch ``base``'s input embedding to sparse gradients where it is tied to a trained head.

    Args:
        base: The causal LM (not a peft or DDP wrapper): ``get_input_embeddings`` / ``get_output_embeddings``.

    Returns:
        What puts the embedding back (dense gradients, no hook), or None where nothing was changed: the embedding
        is not a plain ``nn.Embedding`` tied to the head's weight, or that weight does not train.
    """
    embedding = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if type(embedding) is not nn.Embedding or head is None or getattr(head, "weight", None) is not embedding.weight \
            or not embedding.weight.requires_grad or embedding.sparse:
        return None
    embedding.sparse = True
    handle = embedding.weight.register_post_accumulate_grad_hook(densify_gradient)

    def restore() -> None:
        embedding.sparse = False
        handle.remove()

    return restore


def densify_gradient(parameter: torch.Tensor) -> None:
    """A gradient still sparse after accumulation (only the embedding contributed) made dense for the optimizer."""
    if parameter.grad is not None and parameter.grad.is_sparse:
        parameter.grad = parameter.grad.to_dense()
