"""Task metrics from generation: the reference is the last assistant turn of each record."""

from __future__ import annotations

from typing import Any

from tunesmith.config import GenerationTaskSection
from tunesmith.data.dataset import load_examples
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.metrics import exact_match_score


def run_generation_task(model, tokenizer, section: GenerationTaskSection, system_prompt: str | None = None) -> dict[str, Any]:
    """Generate greedily for each record's prompt and score against its reference answer.

    Returns:
        ``{"metric", "score", "count", "samples"}`` with a few (prompt, prediction, reference) samples.
    """
    from tunesmith.data.formats import FormatOptions
    from tunesmith.inference import generate

    examples, _ = load_examples(section.file, section.format, FormatOptions(system_prompt=system_prompt))
    examples = examples[: section.limit] if section.limit else examples
    prompts, references = [], []
    for example in examples:
        if not example.messages or example.messages[-1]["role"] != "assistant":
            raise TunesmithError(f"{example.where}: an evaluation record must end with the reference answer")
        prompts.append(list(example.messages[:-1]))
        references.append(example.messages[-1]["content"])
    predictions = generate(model, tokenizer, prompts, section.max_new_tokens, batch_size=section.batch_size)
    scores = [exact_match_score([p], [[r]]) for p, r in zip(predictions, references)]
    samples = [{"prompt": p[-1]["content"], "prediction": pred, "reference": ref}
               for p, pred, ref in list(zip(prompts, predictions, references))[:5]]
    return {"metric": section.metric, "score": sum(scores) / len(scores), "count": len(scores), "samples": samples}
