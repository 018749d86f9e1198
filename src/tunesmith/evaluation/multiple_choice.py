"""Multiple choice by log-likelihood: the model "answers" with the choice it finds most likely.

The default requests are lm-evaluation-harness 0.4's, document for document: the context is
``description + (question + " " + answer + "\n\n") per shot + question``, where a question is
``question.strip()``, the options as ``"\nA. " + choice`` lines (letter style) and ``"\nAnswer:"``,
and each choice's continuation is ``" A"``.. (letter style) or ``" " + choice text`` (text style),
tokenised as lm-eval does (:mod:`tunesmith.evaluation.loglikelihood`). The score of a choice is the
summed log-probability of its continuation; ``per_char`` divides it by the characters of the
choice (lm-eval's ``acc_norm``), ``per_byte`` by its UTF-8 bytes (``acc_bytes``), ``per_token``
by its tokens. The named variant ``use_chat_template`` renders the few-shot examples as earlier
user/assistant turns of the model's chat template instead (not lm-eval's default).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

from tunesmith.data.encode import render_prompt
from tunesmith.evaluation.loglikelihood import TOKENISATIONS, ContinuationScore, TokenisationMethod, score_continuations

Normalisation = Literal["sum", "per_token", "per_char", "per_byte"]
NORMALISATIONS: tuple[str, ...] = ("sum", "per_token", "per_char", "per_byte")
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
        tokenisation: ``joint`` (lm-eval's, default) or ``separate`` (see
            :mod:`tunesmith.evaluation.loglikelihood`).
    """

    choice_style: Literal["letter", "text"] = "letter"
    use_chat_template: bool = False
    description: str = ""
    cue: str = "Answer:"
    tokenisation: TokenisationMethod = "joint"


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
    scores: list[list[ContinuationScore]] = field(default_factory=list)

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
                "method": TOKENISATIONS[self.style.tokenisation],
                "tokenisation": self.style.tokenisation,
                "choice_style": self.style.choice_style,
                "chat_template": self.style.use_chat_template,
            },
        }
        if groups:
            result["groups"] = groups
            result["macro_accuracy"] = sum(g["accuracy"] for g in groups.values()) / len(groups)
        return {**result, **self.extra}


def format_question(item: MultipleChoiceItem, style: PromptStyle) -> str:
    """The question block: the stripped question, ``A. choice`` lines when answers are letters (choices
    as they are, like lm-eval's MMLU template), then the cue."""
    options = ""
    if style.choice_style == "letter":
        options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    cue = f"\n{style.cue}" if style.cue else ""
    return f"{item.question.strip()}{options}{cue}"


def choice_text(item: MultipleChoiceItem, index: int, style: PromptStyle) -> str:
    """What choice ``index`` is called: its letter, or its text (lm-eval's ``doc_to_choice``)."""
    return LETTERS[index] if style.choice_style == "letter" else item.choices[index]


def answer_text(item: MultipleChoiceItem, index: int, style: PromptStyle) -> str:
    """The continuation scored for choice ``index``: ``" " + choice`` (lm-eval's target delimiter),
    without the space inside a chat reply."""
    text = choice_text(item, index, style)
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

        messages = [{"role": "system", "content": description}] if description else []
        for shot in shots:
            messages += [{"role": "user", "content": format_question(shot, style)},
                         {"role": "assistant", "content": answer_text(shot, shot.answer, style)}]
        messages.append({"role": "user", "content": format_question(item, style)})
        return render_prompt(tokenizer, messages)
    blocks = [format_question(shot, style) + answer_text(shot, shot.answer, style) for shot in shots]
    return description + "".join(block + "\n\n" for block in blocks) + format_question(item, style)


def normalised_scores(scores: Sequence[ContinuationScore], choices: Sequence[str], normalisation: str) -> list[float]:
    """The values compared under a normalisation; ``per_char``/``per_byte`` divide by the length of
    the choice itself (without the leading space), as lm-eval's ``acc_norm``/``acc_bytes`` do."""
    if normalisation == "per_token":
        return [s.logprob / s.num_tokens for s in scores]
    if normalisation == "per_char":
        return [s.logprob / max(len(c), 1) for s, c in zip(scores, choices)]
    if normalisation == "per_byte":
        return [s.logprob / max(len(c.encode("utf-8")), 1) for s, c in zip(scores, choices)]
    return [s.logprob for s in scores]


def choose(scores: Sequence[ContinuationScore], normalisation: str, choices: Sequence[str]) -> int:
    """Index of the best choice under a normalisation (the first one on ties, as ``numpy.argmax``)."""
    values = normalised_scores(scores, choices, normalisation)
    return values.index(max(values))


def evaluate_multiple_choice(model, tokenizer, items: Sequence[MultipleChoiceItem], *,
                             normalisation: Normalisation = "sum", few_shot: int = 0,
                             few_shot_pool: Sequence[MultipleChoiceItem] = (),
                             style: PromptStyle = PromptStyle(), batch_size: int = 16,
                             progress: Optional[Callable[[int], None]] = None) -> MultipleChoiceResult:
    """Answer each item with its most likely choice and measure accuracy.

    Args:
        model: Causal LM in eval mode.
        tokenizer: Its tokenizer (carrying the chat template of training when ``style`` uses it).
        items: The questions scored.
        normalisation: ``sum``, ``per_token``, ``per_char`` or ``per_byte``: which decides the
            prediction (all accuracies are reported).
        few_shot: Solved examples put before each question.
        few_shot_pool: Where the examples come from (e.g. MMLU ``dev``); the items themselves
            when empty.
        style: Prompt layout.
        batch_size: Sequences per forward pass.
        progress: Called with the number of items finished after each forward pass.

    Returns:
        A :class:`MultipleChoiceResult`; ``.accuracy()`` and ``.as_dict()`` give the numbers,
        ``.scores`` the log-likelihood of every choice of every item.

    Raises:
        ValueError: For an unknown normalisation or an empty item list.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
    if not items:
        raise ValueError("no items to evaluate")
    pool = list(few_shot_pool) or list(items)
    requests, owners, groups = [], [], []
    for index, item in enumerate(items):
        shots = pick_shots(item, pool, few_shot)
        context = build_context(tokenizer, item, shots, style)
        # items with the same shots and group share the description and few-shot block: one cached prefix
        group = (item.group, tuple(shot.where or id(shot) for shot in shots))
        for choice in range(len(item.choices)):
            requests.append((context, answer_text(item, choice, style)))
            owners.append(index)
            groups.append(group)
    remaining = [len(item.choices) for item in items]

    def scored(request_indices: list[int]) -> None:
        finished = 0
        for request_index in request_indices:
            remaining[owners[request_index]] -= 1
            finished += remaining[owners[request_index]] == 0
        if progress and finished:
            progress(finished)

    add_bos = False if style.use_chat_template else (None if style.tokenisation == "joint" else True)
    scores = score_continuations(model, tokenizer, requests, batch_size, add_bos=add_bos,
                                 tokenisation=style.tokenisation, groups=groups, on_scored=scored)
    per_item: list[list[ContinuationScore]] = [[] for _ in items]
    for owner, score in zip(owners, scores):
        per_item[owner].append(score)
    choices = [[choice_text(item, i, style) for i in range(len(item.choices))] for item in items]
    predictions = {n: [choose(s, n, c) for s, c in zip(per_item, choices)] for n in NORMALISATIONS}
    return MultipleChoiceResult(normalisation, predictions, [i.answer for i in items], [i.group for i in items],
                                few_shot, style, scores=per_item)


def multiple_choice_accuracy(model, tokenizer, items: Sequence[MultipleChoiceItem], **options) -> float:
    """Accuracy of :func:`evaluate_multiple_choice` under its chosen normalisation (same options)."""
    return evaluate_multiple_choice(model, tokenizer, items, **options).accuracy()
