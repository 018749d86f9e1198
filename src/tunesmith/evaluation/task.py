"""Task metrics from generation: the reference is the last assistant turn of each record."""

from __future__ import annotations

from typing import Any

from tunesmith.config import GenerationTaskSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.dataset import load_examples
from tunesmith.data.formats import FormatOptions
from tunesmith.evaluation.metrics import exact_match_score, rouge, token_f1
from tunesmith.inference.generate import generate


def score_answer(metric: str, prediction: str, reference: str) -> float:
    """One answer's score under the task's metric."""
    if metric == "rougeL":
        return rouge([prediction], [[reference]], "rougeL")
    if metric == "token_f1":
        return token_f1(prediction, reference)
    return exact_match_score([prediction], [[reference]])


def run_generation_task(model, tokenizer, section: GenerationTaskSection, system_prompt: str | None = None,
                        columns=None) -> dict[str, Any]:
    """Generate greedily for each record's prompt and score against its reference answer.

    ``columns`` (the recipe's ``data.columns``) maps a table's columns when the section names none.

    Returns:
        ``{"metric", "score", "count", "samples"}`` with a few (prompt, prediction, reference) samples.
    """

    options = FormatOptions(system_prompt=system_prompt, columns=section.columns or columns)
    examples, _ = load_examples(section.file, section.format, options)
    examples = examples[: section.limit] if section.limit else examples
    prompts, references = [], []
    for example in examples:
        if not example.messages or example.messages[-1]["role"] != "assistant":
            raise TunesmithError(f"{example.where}: an evaluation record must end with the reference answer")
        prompts.append(list(example.messages[:-1]))
        references.append(example.messages[-1]["content"])
    predictions = generate(model, tokenizer, prompts, section.max_new_tokens, batch_size=section.batch_size)
    scores = [score_answer(section.metric, p, r) for p, r in zip(predictions, references)]
    samples = [{"prompt": p[-1]["content"], "prediction": pred, "reference": ref}
               for p, pred, ref in list(zip(prompts, predictions, references))[:5]]
    return {"metric": section.metric, "score": sum(scores) / len(scores), "count": len(scores), "samples": samples}
