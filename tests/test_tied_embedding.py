"""A tied embedding's gradient added by token rows (training/tied_embedding.py) against torch's dense embedding backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.training.chunked_loss import chunked_loss_sum
from tunesmith.training.tied_embedding import sparse_tied_embedding_gradient


def tied_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in (40, 25):
        ids = torch.randint(3, 60, (2, length), generator=generator)  # few distinct tokens: rows repeat
        labels = ids.clone()
        labels[:, :5] = -100  # a prompt
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def step(model: LlamaForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Two accumulated micro-batches through the fused head, then one fused AdamW step: (gradient, weight)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for batch in batches():
        chunked_loss_sum(model, batch, chunk_tokens=16).backward()
    gradient = model.get_input_embeddings().weight.grad.clone()
    optimizer.step()
    return gradient, model.get_input_embeddings().weight.detach().clone()


def test_token_rows_give_the_dense_gradient_and_step() -> None:
    dense_gradient, dense_weight = step(tied_llama())
    model = tied_llama()
    restore = sparse_tied_embedding_gradient(model)
    assert restore is not None and model.get_input_embeddings().sparse
    gradient, weight = step(model)
    assert not gradient.is_sparse
    # The same sum in another order: equal to a few float32 roundings (entries of about 1 here), and bit for bit in
    # the rows no token of the batch uses.
    torch.testing.assert_close(gradient, dense_gradient, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight, dense_weight, rtol=1e-5, atol=1e-6)
    unused = torch.ones(512, dtype=torch.bool)
    for batch in batches():
        unused[batch["input_ids"].flatten()] = False
    assert torch.equal(gradient[unused], dense_gradient[unused])
    restore()
    assert not model.get_input_embeddings().sparse


def test_a_gradient_from_the_embedding_alone_is_made_dense() -> None:
    model = tied_llama()
    restore = sparse_tied_embedding_gradient(model)
    model.get_input_embeddings()(torch.tensor([[3, 4, 3]])).sum().backward()
    gradient = model.get_input_embeddings().weight.grad
    assert not gradient.is_sparse
    assert torch.equal(gradient[3], torch.full((64,), 2.0)) and gradient[5].abs().sum() == 0
    restore()
    model.zero_grad(set_to_none=True)
    model.get_input_embeddings()(torch.tensor([[3]])).sum().backward()
    assert not model.get_input_embeddings().weight.grad.is_sparse


@pytest.mark.parametrize("case", ["untied", "frozen"])
def test_left_alone_without_a_trained_tied_head(case: str) -> None:
    model = tied_llama(tie=case != "untied")
    if case == "frozen":
        model.requires_grad_(False)
    assert sparse_tied_embedding_gradient(model) is None
    assert not model.get_input_embeddings().sparse
