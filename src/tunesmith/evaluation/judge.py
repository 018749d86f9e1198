"""A model as judge: pairwise preference (both orders) and single-answer grading against a rubric.

The judge is a local model (alias, folder or run folder, loaded by :func:`tunesmith.inference.generate.load_for_inference`)
or any OpenAI-compatible chat endpoint (``tunesmith serve`` included). Its prompts follow MT-Bench's
``pair-v2`` and ``single-v1`` judges (Zheng et al. 2023, https://arxiv.org/abs/2306.05685) in tunesmith's wording.

Verdicts are parsed strictly: a pairwise verdict must contain exactly one distinct ``[[A]]``, ``[[B]]``
or ``[[C]]`` (C: a tie), a grade exactly one distinct ``[[N]]`` with 1 <= N <= 10; anything else is
*invalid* (kept, counted, never guessed). ``method: logprob`` (local judges only) reads the verdict
from the judge's next-token log-probabilities after ``[[`` instead of sampling text, so it is always
valid; the raw verdict then records the log-probabilities.

Position bias: each pair is judged twice, the answers swapped; when the two verdicts disagree the
outcome is a tie (MT-Bench's rule), and the share of pairs where they agree is reported.
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from typing import Optional, Sequence

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.loglikelihood import score_continuations
from tunesmith.inference.generate import generate, render_prompt

PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Choose the assistant that follows the user's instructions and answers the "
    "user's question better: consider helpfulness, relevance, accuracy, depth and level of detail. Do not let the "
    "order of the responses, their length or the assistants' names influence you. Be as objective as possible. "
    "After a short explanation, output your final verdict strictly in this format: \"[[A]]\" if assistant A is "
    "better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
PAIR_TEMPLATE = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
                 "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
                 "[The End of Assistant B's Answer]")
SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. {rubric} After a short explanation, rate the response on a scale of 1 to 10 "
    "strictly in this format: \"[[rating]]\", for example: \"Rating: [[5]]\".")
DEFAULT_RUBRIC = ("Consider helpfulness, relevance, accuracy, depth, creativity and level of detail; "
                  "be as objective as possible.")
SINGLE_TEMPLATE = ("[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
                   "[The End of Assistant's Answer]")
PAIR_VERDICT = re.compile(r"\[\[([ABC])\]\]")
GRADE_VERDICT = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def parse_pair_verdict(text: str) -> Optional[str]:
    """``A``, ``B`` or ``C`` (tie) when the text holds exactly one distinct ``[[X]]`` verdict, else None."""
    found = set(PAIR_VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def parse_grade(text: str) -> Optional[float]:
    """The grade when the text holds exactly one distinct ``[[N]]`` with 1 <= N <= 10, else None."""
    found = {float(v) for v in GRADE_VERDICT.findall(text)}
    if len(found) != 1:
        return None
    value = found.pop()
    return value if 1.0 <= value <= 10.0 else None


def pair_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The pairwise judge's conversation (system + one user turn)."""
    return [{"role": "system", "content": PAIR_SYSTEM},
            {"role": "user", "content": PAIR_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)}]


def grade_messages(question: str, answer: str, rubric: str = DEFAULT_RUBRIC) -> list[dict[str, str]]:
    """The single-answer judge's conversation (system with the rubric + one user turn)."""
    return [{"role": "system", "content": SINGLE_SYSTEM.format(rubric=rubric)},
            {"role": "user", "content": SINGLE_TEMPLATE.format(question=question, answer=answer)}]


# ---- judges -----------------------------------------------------------------------------------------

class Judge:
    """Gives a raw verdict text for each conversation; ``options`` are the verdict symbols a reply may name."""

    name = "judge"

    def verdicts(self, conversations: Sequence[list[dict[str, str]]], options: Sequence[str]) -> list[str]:
        raise NotImplementedError


class LocalJudge(Judge):
    """A loaded causal LM as judge: greedy text (``generate``) or the most likely symbol after ``[[`` (``logprob``)."""

    def __init__(self, model, tokenizer, name: str, method: str = "generate", max_new_tokens: int = 256,
                 batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.method, self.max_new_tokens, self.batch_size = method, max_new_tokens, batch_size

    def verdicts(self, conversations, options):

        if self.method == "generate":
            return generate(self.model, self.tokenizer, [list(c) for c in conversations], self.max_new_tokens,
                            batch_size=self.batch_size)
        return self._most_likely(conversations, options)

    def _most_likely(self, conversations, options) -> list[str]:
        """One scoring pass for every conversation's options; a conversation's options share its cached prefix."""

        contexts = [render_prompt(self.tokenizer, list(c)) + "[[" for c in conversations]
        requests = [(context, f"{o}]]") for context in contexts for o in options]
        groups = [index for index in range(len(contexts)) for _ in options]
        scores = score_continuations(self.model, self.tokenizer, requests, batch_size=self.batch_size * len(options),
                                     add_bos=False, groups=groups)
        verdicts = []
        for index in range(len(contexts)):
            logprobs = {o: scores[index * len(options) + k].logprob for k, o in enumerate(options)}
            best = max(logprobs, key=logprobs.get)
            listed = ", ".join(f"{o}: {v:.4f}" for o, v in logprobs.items())
            verdicts.append(f"[[{best}]] (log-probabilities after '[[': {listed})")
        return verdicts


class EndpointJudge(Judge):
    """Any OpenAI-compatible ``/chat/completions`` endpoint, temperature 0."""

    def __init__(self, base_url: str, model: str, max_tokens: int = 256, api_key: Optional[str] = None,
                 timeout: float = 300.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = f"{model}@{base_url}"
        self.model, self.max_tokens, self.api_key, self.timeout = model, max_tokens, api_key, timeout

    def verdicts(self, conversations, options):
        return [self._ask(conversation) for conversation in conversations]

    def _ask(self, conversation) -> str:
        body = json.dumps({"model": self.model, "messages": list(conversation), "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except OSError as error:
            raise TunesmithError(f"judge endpoint {self.url} did not answer ({error}); check judge.endpoint and that "
                                 "the server is running") from None
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise TunesmithError(f"judge endpoint {self.url} returned no chat completion: {str(reply)[:200]}") from None


# ---- pairwise and single judgements ---------------------------------------------------------------------

@dataclass(frozen=True)
class PairJudgement:
    """One question judged twice: A (the evaluated answer) first, then swapped.

    ``outcome`` is from A's side: win, loss, tie, or invalid (a verdict that did not parse).
    ``consistent`` says whether the two orders agreed (None when one was invalid).
    """

    question: str
    answer_a: str
    answer_b: str
    prompts: tuple[list[dict[str, str]], list[dict[str, str]]]
    raw: tuple[str, str]
    parsed: tuple[Optional[str], Optional[str]]
    outcome: str
    consistent: Optional[bool]

    def as_dict(self) -> dict:
        return {"question": self.question, "answer_a": self.answer_a, "answer_b": self.answer_b,
                "verdicts": [{"order": order, "prompt": prompt, "raw": raw, "parsed": parsed}
                             for order, prompt, raw, parsed in zip(("a_first", "b_first"), self.prompts, self.raw,
                                                                   self.parsed)],
                "outcome": self.outcome, "consistent": self.consistent}


def _side(verdict: Optional[str], a_symbol: str) -> Optional[str]:
    """A verdict symbol as A's outcome, given which symbol A had in that order."""
    if verdict is None:
        return None
    return "tie" if verdict == "C" else ("win" if verdict == a_symbol else "loss")


def combine_orders(first: Optional[str], second: Optional[str]) -> tuple[str, Optional[bool]]:
    """The outcome of both orders (A's side): the shared one when they agree, else a tie; invalid when one is."""
    if first is None or second is None:
        return "invalid", None
    return (first, True) if first == second else ("tie", False)


def judge_pairs(judge: Judge, questions: Sequence[str], answers_a: Sequence[str],
                answers_b: Sequence[str]) -> list[PairJudgement]:
    """Judge every question's two answers in both orders.

    Args:
        judge: The judge.
        questions: The user questions.
        answers_a: The evaluated answers (e.g. the tuned model's).
        answers_b: The answers they are compared with (e.g. the base model's).

    Returns:
        One :class:`PairJudgement` per question, outcomes from A's side.
    """
    if not len(questions) == len(answers_a) == len(answers_b):
        raise ValueError("questions and both answer lists must have the same length")
    first = [pair_messages(q, a, b) for q, a, b in zip(questions, answers_a, answers_b)]
    second = [pair_messages(q, b, a) for q, a, b in zip(questions, answers_a, answers_b)]
    raw = judge.verdicts(first + second, ("A", "B", "C"))
    judgements = []
    for index, question in enumerate(questions):
        raw_pair = (raw[index], raw[len(questions) + index])
        parsed = (parse_pair_verdict(raw_pair[0]), parse_pair_verdict(raw_pair[1]))
        outcome, consistent = combine_orders(_side(parsed[0], "A"), _side(parsed[1], "B"))
        judgements.append(PairJudgement(question, answers_a[index], answers_b[index], (first[index], second[index]),
                                        raw_pair, parsed, outcome, consistent))
    return judgements


@dataclass(frozen=True)
class Grade:
    """One answer graded against the rubric (``score`` None when the verdict did not parse)."""

    question: str
    answer: str
    prompt: list[dict[str, str]]
    raw: str
    score: Optional[float]

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "prompt": self.prompt, "raw": self.raw,
                "score": self.score}


GRADE_OPTIONS = tuple(str(n) for n in range(1, 11))


def grade_answers(judge: Judge, questions: Sequence[str], answers: Sequence[str],
                  rubric: str = DEFAULT_RUBRIC) -> list[Grade]:
    """Grade every answer 1-10 against ``rubric`` (MT-Bench single-answer grading)."""
    prompts = [grade_messages(q, a, rubric) for q, a in zip(questions, answers)]
    raw = judge.verdicts(prompts, GRADE_OPTIONS)
    return [Grade(q, a, p, r, parse_grade(r)) for q, a, p, r in zip(questions, answers, prompts, raw)]
