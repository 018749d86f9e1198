"""Multiple choice by log-likelihood: the model "answers" with the choice it finds most likely.

Each item becomes a prompt (question, lettered options, ``Answer:``) and one continuation per
choice (``" A"``, ``" B"``, ... or the choice text itself). The score of a choice is the summed
log-probability of its continuation, optionally normalised by its token or character count
(per-token and per-character normalisation remove the bias towards short answers when the
continuations are the choice texts; see the lm-evaluation-harness ``acc_norm`` discussion).
Few-shot examples are solved items placed before the question: plain text separated by blank
lines, or earlier user/assistant turns when the chat template is used.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from tunesmith.evaluation.loglikelihood import TOKENISATION, ContinuationScore, score_continuations

Normalisation = Literal["sum", "per_token", "per_char"]
NORMALISATIONS: tuple[str, ...] = ("sum", "per_token", "per_char")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question with its choices and the index of the right one.

    Attributes:
        question: The question text.
        choices: The possible answers, in order.
        answer: Index of the correct choice.
        where: ``file:row`` of the item, for messages.
        group: Subject or category for per-group averages (MMLU subject), or None.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    where: str = ""
    group: Optional[str] = None


@dataclass(frozen=True)
class PromptStyle:
    """How items become prompts and continuations.

    Attributes:
        choice_style: ``letter`` scores " A"/" B"/... after listing the options; ``text`` scores
            the choice text itself and does not list the options.
        use_chat_template: Render the prompt with the tokenizer's chat template (the template of
            training), the question as a user turn and the answer as the assistant's reply.
        description: Text placed once before everything; ``{group}`` becomes the item's group
            with underscores as spaces (MMLU's "The following are ... about {group}.").
        cue: The line after the question that the answer follows (empty: none).
    """

    choice_style: Literal["letter", "text"] = "letter"
    use_chat_template: bool = False
    description: str = ""
    cue: str = "Answer:"


@dataclass(frozen=True)
class MultipleChoiceResult:
    """Scores of a set of items; ``as_dict`` gives the JSON form."""

    normalisation: str
    predictions: dict[str, list[int]]
    answers: list[int]
    groups: list[Optional[str]]
    few_shot: int
    style: PromptStyle
    extra: dict = field(default_factory=dict)

    def accuracy(self, normalisation: Optional[str] = None) -> float:
        """Share of items whose best-scoring choice is the answer."""
        predicted = self.predictions[normalisation or self.normalisation]
        return sum(p == a for p, a in zip(predicted, self.answers)) / len(self.answers)

    def group_accuracies(self) -> dict[str, dict[str, float]]:
        """``{group: {"accuracy", "count"}}`` under the chosen normalisation."""
        hits: dict[str, list[bool]] = defaultdict(list)
        for predicted, answer, group in zip(self.predictions[self.normalisation], self.answers, self.groups):
            if group is not None:
                hits[group].append(predicted == answer)
        return {g: {"accuracy": sum(h) / len(h), "count": len(h)} for g, h in sorted(hits.items())}

    def as_dict(self) -> dict:
        groups = self.group_accuracies()
        result = {
            "accuracy": self.accuracy(),
            "normalisation": self.normalisation,
            "accuracy_by_normalisation": {n: self.accuracy(n) for n in NORMALISATIONS},
            "count": len(self.answers),
            "few_shot": self.few_shot,
            "tokenisation": {
                "method": TOKENISATION,
                "choice_style": self.style.choice_style,
                "chat_template": self.style.use_chat_template,
            },
        }
        if groups:
            result["groups"] = groups
            result["macro_accuracy"] = sum(g["accuracy"] for g in groups.values()) / len(groups)
        return {**result, **self.extra}


def format_question(item: MultipleChoiceItem, style: PromptStyle) -> str:
    """The question block: the question, ``A. choice`` lines when answers are letters, then the cue."""
    options = ""
    if style.choice_style == "letter":
        options = "".join(f"\n{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(item.choices))
    cue = f"\n{style.cue}" if style.cue else ""
    return f"{item.question.strip()}{options}{cue}"


def answer_text(item: MultipleChoiceItem, index: int, style: PromptStyle) -> str:
    """The continuation scored for choice ``index`` (no leading space inside a chat reply)."""
    text = LETTERS[index] if style.choice_style == "letter" else item.choices[index].strip()
    return text if style.use_chat_template else f" {text}"


def pick_shots(item: MultipleChoiceItem, pool: Sequence[MultipleChoiceItem], count: int) -> list[MultipleChoiceItem]:
    """The first ``count`` pool items of the item's group (any group when too few), never the item itself.

    Deterministic, as MMLU's own evaluation takes the first k dev questions of each subject.
    """
    if count == 0:
        return []
    candidates = [p for p in pool if p != item]
    same_group = [p for p in candidates if p.group == item.group]
    chosen = same_group[:count]
    chosen += [p for p in candidates if p not in chosen][: count - len(chosen)]
    return chosen


def build_context(tokenizer, item: MultipleChoiceItem, shots: Sequence[MultipleChoiceItem], style: PromptStyle) -> str:
    """The text every choice of ``item`` is scored after."""
    description = style.description.format(group=(item.group or "").replace("_", " "))
    if style.use_chat_template:
        from tunesmith.data.encode import render_prompt

        messages = [{"role": "system", "content": description}] if description else []
        for shot in shots:
            messages += [{"role": "user", "content": format_question(shot, style)},
                         {"role": "assistant", "content": answer_text(shot, shot.answer, style)}]
        messages.append({"role": "user", "content": format_question(item, style)})
        return render_prompt(tokenizer, messages)
    blocks = [format_question(shot, style) + answer_text(shot, shot.answer, style) for shot in shots]
    return description + "".join(block + "\n\n" for block in blocks) + format_question(item, style)


def choose(scores: Sequence[ContinuationScore], normalisation: str) -> int:
    """Index of the best choice under a normalisation (the first one on ties)."""
    def value(score: ContinuationScore) -> float:
        if normalisation == "per_token":
            return score.logprob / score.num_tokens
        if normalisation == "per_char":
            return score.logprob / max(score.num_chars, 1)
        return score.logprob

    values = [value(s) for s in scores]
    return values.index(max(values))


def evaluate_multiple_choice(model, tokenizer, items: Sequence[MultipleChoiceItem], *,
                             normalisation: Normalisation = "sum", few_shot: int = 0,
                             few_shot_pool: Sequence[MultipleChoiceItem] = (),
                             style: PromptStyle = PromptStyle(), batch_size: int = 16) -> MultipleChoiceResult:
    """Answer each item with its most likely choice and measure accuracy.

    Args:
        model: Causal LM in eval mode.
        tokenizer: Its tokenizer (carrying the chat template of training when ``style`` uses it).
        items: The questions scored.
        normalisation: ``sum``, ``per_token`` or ``per_char``: which decides the prediction
            (all three accuracies are reported).
        few_shot: Solved examples put before each question.
        few_shot_pool: Where the examples come from (e.g. MMLU ``dev``); the items themselves
            when empty.
        style: Prompt layout.
        batch_size: Sequences per forward pass.

    Returns:
        A :class:`MultipleChoiceResult`; ``.accuracy()`` and ``.as_dict()`` give the numbers.

    Raises:
        ValueError: For an unknown normalisation or an empty item list.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
    if not items:
        raise ValueError("no items to evaluate")
    pool = list(few_shot_pool) or list(items)
    requests, owners = [], []
    for index, item in enumerate(items):
        context = build_context(tokenizer, item, pick_shots(item, pool, few_shot), style)
        for choice in range(len(item.choices)):
            requests.append((context, answer_text(item, choice, style)))
            owners.append(index)
    scores = score_continuations(model, tokenizer, requests, batch_size, add_bos=not style.use_chat_template)
    per_item: list[list[ContinuationScore]] = [[] for _ in items]
    for owner, score in zip(owners, scores):
        per_item[owner].append(score)
    predictions = {n: [choose(s, n) for s in per_item] for n in NORMALISATIONS}
    return MultipleChoiceResult(normalisation, predictions, [i.answer for i in items], [i.group for i in items],
                                few_shot, style)


def multiple_choice_accuracy(model, tokenizer, items: Sequence[MultipleChoiceItem], **options) -> float:
    """Accuracy of :func:`evaluate_multiple_choice` under its chosen normalisation (same options)."""
    return evaluate_multiple_choice(model, tokenizer, items, **options).accuracy()
