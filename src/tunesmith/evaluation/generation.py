"""Generation tasks: records become prompts (optionally after solved examples) and greedy replies."""

from __future__ import annotations

from pathlib import Path

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.benchmarks import read_records
from tunesmith.evaluation.filters import cut_at_stop
from tunesmith.evaluation.progress import item_progress
from tunesmith.evaluation.tasks import GenerationTask
from tunesmith.inference.generate import generate


def field_text(value: object) -> str:
    """A record field as prompt text: lists (SciTLDR's sentences) joined by spaces."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def format_prompt(template: str, record: dict, where: str) -> str:
    """``template`` with ``{field}`` replaced by the record's fields.

    Raises:
        TunesmithError: If the template names a field the record lacks.
    """
    try:
        return template.format(**{k: field_text(v) for k, v in record.items()})
    except KeyError as error:
        raise TunesmithError(f"{where}: the prompt template uses field {error} that this record lacks") from None


def references_of(record: dict, field: str, where: str) -> list[str]:
    """The reference strings of a record (a string or a non-empty list of strings)."""
    value = record[field]
    references = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if not references or not all(r.strip() for r in references):
        raise TunesmithError(f"{where}: '{field}' must be a non-empty string or list of strings")
    return references


def few_shot_turns(task: GenerationTask, records: list[tuple[str, dict]]) -> list[dict[str, str]]:
    """Solved examples as earlier user/assistant turns (from few_shot_path, else the first records)."""
    if not task.few_shot:
        return []
    pool = read_records(Path(task.few_shot_path), (task.reference_field,)) if task.few_shot_path else records
    turns: list[dict[str, str]] = []
    for where, record in pool[: task.few_shot]:
        turns += [{"role": "user", "content": format_prompt(task.prompt, record, where)},
                  {"role": "assistant", "content": references_of(record, task.reference_field, where)[0]}]
    return turns


def generate_for_records(model, tokenizer, task: GenerationTask) -> tuple[list[str], list[list[str]], list[str]]:
    """Greedy replies to each record of the task file.

    When the few-shot examples come from the scored file itself, they are skipped from scoring.

    Returns:
        ``(predictions, references, prompts)``.
    """

    skip = task.few_shot if task.few_shot and not task.few_shot_path else 0
    limit = task.limit + skip if task.limit else None
    records = read_records(Path(task.path), (task.reference_field,), limit)
    shots = few_shot_turns(task, records)
    scored = records[skip:]
    if not scored:
        raise TunesmithError(f"{task.path}: no records left to score after the {skip} few-shot examples")
    prompts = [format_prompt(task.prompt, record, where) for where, record in scored]
    references = [references_of(record, task.reference_field, where) for where, record in scored]
    conversations = [[*shots, {"role": "user", "content": prompt}] for prompt in prompts]
    predictions: list[str] = []
    with item_progress(task.name, len(conversations), "record") as advance:
        for start in range(0, len(conversations), task.batch_size):  # one batch at a time, for the bar
            batch = conversations[start : start + task.batch_size]
            replies = generate(model, tokenizer, batch, task.max_new_tokens, batch_size=task.batch_size)
            predictions += [cut_at_stop(reply, task.until).strip() for reply in replies]
            advance(len(batch))
    return predictions, references, prompts
