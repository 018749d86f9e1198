"""Reference data for the Fisher: a file of general text, or samples of the model itself."""

from __future__ import annotations

import torch

from tunesmith.config import EwcSection
from tunesmith.data.encode import EncodedExample
from tunesmith.data.encoded import encode_all, load_examples


def reference_examples(section: EwcSection, model, tokenizer, seed: int) -> list[EncodedExample]:
    """``section.samples`` encoded reference examples (every token is a target)."""
    if section.data == "generations":
        return sample_from_model(model, tokenizer, section.samples, section.max_length, seed)
    examples, _ = load_examples(section.data, section.format)
    encoded, _ = encode_all(examples[: section.samples], tokenizer, section.max_length, "EWC reference", "all")
    return encoded


@torch.no_grad()
def sample_from_model(model, tokenizer, count: int, max_length: int, seed: int,
                      batch_size: int = 16) -> list[EncodedExample]:
    """Sequences the model writes from its start token (ancestral sampling, temperature 1).

    Their targets follow the model's own distribution, so the Fisher computed on them is the model's
    true Fisher rather than the empirical one. Runs in a forked RNG so the training run's random stream
    is the same whether the Fisher was cached or not.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sequences: list[EncodedExample] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while len(sequences) < count:
            rows = min(batch_size, count - len(sequences))
            prompt = torch.full((rows, 1), start, dtype=torch.long, device=device)
            output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                    temperature=1.0, top_k=0, top_p=1.0, max_length=max_length,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in output.tolist():
                ids = cut_after_end(row, tokenizer.eos_token_id)
                sequences.append(EncodedExample(tuple(ids), tuple(ids)))
    model.train(was_training)
    return sequences


def cut_after_end(ids: list[int], eos_token_id) -> list[int]:
    """Up to and including the first end token after the start token."""
    if eos_token_id is not None and eos_token_id in ids[1:]:
        return ids[: ids.index(eos_token_id, 1) + 1]
    return ids
