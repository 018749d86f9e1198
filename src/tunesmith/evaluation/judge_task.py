"""The ``judge`` task kind: answer the questions, have the judge compare or grade, and summarise.

Public pieces the studio's Evaluate screen can call directly: :func:`build_judge` (a section -> a judge),
:func:`read_questions`, :func:`tunesmith.evaluation.judge.judge_pairs` / ``grade_answers`` and
:func:`pairwise_result` / :func:`single_result` (verdicts -> the common task result).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.benchmarks import json_object
from tunesmith.evaluation.judge import (
    EndpointJudge,
    Grade,
    Judge,
    LocalJudge,
    PairJudgement,
    grade_answers,
    judge_pairs,
)
from tunesmith.evaluation.judge_stats import summarise_grades, summarise_pairs
from tunesmith.evaluation.results import task_result
from tunesmith.evaluation.tasks import JudgeSource, JudgeTask
from tunesmith.inference.generate import generate, load_for_inference

JUDGE_NOTE = ("verdicts parsed strictly (exactly one distinct [[A]]/[[B]]/[[C]] or [[1..10]], else invalid); "
              "both orders, a tie when they disagree; win rate = (wins + ties/2)/valid with a percentile "
              "bootstrap 95% interval; lc_win_rate: logistic regression on tanh(length difference/sd) in "
              "characters, read at zero difference (AlpacaEval-LC style)")


def build_judge(source: JudgeSource, batch_size: int = 8) -> Judge:
    """The judge a task's ``judge`` section names (a local model is loaded here)."""
    if source.endpoint is not None:
        return EndpointJudge(source.endpoint, source.endpoint_model, source.max_new_tokens)
    model, tokenizer = load_for_inference(source.model)
    return LocalJudge(model, tokenizer, source.model, source.method, source.max_new_tokens, batch_size)


def read_questions(path: Path, field: str, limit: Optional[int] = None) -> list[str]:
    """The questions of a JSONL file (a list field, MT-Bench's ``turns``, gives its first element)."""
    if not path.is_file():
        raise TunesmithError(f"judge task file {path} does not exist")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json_object(line, f"{path}:{number}")
        turns_instead = field == "question" and field not in record and "turns" in record
        value = record["turns"] if turns_instead else record.get(field)
        value = value[0] if isinstance(value, list) and value else value
        if not isinstance(value, str) or not value.strip():
            raise TunesmithError(f"{path}:{number}: field '{field}' must be a non-empty string (or list of them)")
        questions.append(value)
        if limit and len(questions) >= limit:
            break
    if not questions:
        raise TunesmithError(f"{path}: no questions")
    return questions


def read_answers(path: Path, count: int) -> list[str]:
    """The ``answer`` field of each line of a JSONL file, exactly ``count`` of them used."""
    answers = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
                raise TunesmithError(f"{path}:{number}: each line needs a string field 'answer'")
            answers.append(record["answer"])
    if len(answers) < count:
        raise TunesmithError(f"{path}: {len(answers)} answers for {count} questions; give one per question, in order")
    return answers[:count]


def answer(model, tokenizer, questions: Sequence[str], max_new_tokens: int, batch_size: int,
           system_prompt: Optional[str] = None) -> list[str]:
    """Greedy replies through the model's chat template (after ``system_prompt`` when given)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return generate(model, tokenizer, [[*system, {"role": "user", "content": q}] for q in questions], max_new_tokens,
                    batch_size=batch_size)


def pairwise_result(judgements: Sequence[PairJudgement], judge_name: str, examples: int = 3, resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Pairwise verdicts as a task result: headline ``win_rate``, every verdict kept in ``details``."""
    metrics = summarise_pairs([j.outcome for j in judgements], [j.consistent for j in judgements],
                              [len(j.answer_a) for j in judgements], [len(j.answer_b) for j in judgements],
                              resamples, seed)
    samples = [{"prompt": j.question, "answer": j.answer_a, "against": j.answer_b, "outcome": j.outcome,
                "verdicts": list(j.raw)} for j in judgements[:examples]]
    return task_result("judge", "win_rate", metrics, len(judgements), samples=samples,
                       details={"mode": "pairwise", "judge": judge_name, "items": [j.as_dict() for j in judgements]},
                       tokenisation={"judge": judge_name, "method": JUDGE_NOTE})


def single_result(grades: Sequence[Grade], judge_name: str, examples: int = 3, resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Single-answer grades as a task result: headline ``mean_grade`` (1-10)."""
    metrics = summarise_grades([g.score for g in grades], resamples, seed)
    samples = [{"prompt": g.question, "answer": g.answer, "score": g.score, "verdicts": [g.raw]}
               for g in grades[:examples]]
    return task_result("judge", "mean_grade", metrics, len(grades), samples=samples,
                       details={"mode": "single", "judge": judge_name, "items": [g.as_dict() for g in grades]},
                       tokenisation={"judge": judge_name, "method": JUDGE_NOTE})


def run_judge_task(model, tokenizer, task: JudgeTask) -> dict[str, Any]:
    """Answer the task's questions with ``model``, then judge them (pairwise or single)."""
    questions = read_questions(Path(task.path), task.question_field, task.limit)
    answers = answer(model, tokenizer, questions, task.max_new_tokens, task.batch_size, task.system_prompt)
    judge = build_judge(task.judge, task.batch_size)
    if task.mode == "single":
        grades = grade_answers(judge, questions, answers, task.rubric)
        return single_result(grades, judge.name, task.examples, task.resamples, task.seed)
    if task.against_answers is not None:
        others = read_answers(Path(task.against_answers), len(questions))
    else:
        other_model, other_tokenizer = load_for_inference(task.against)
        others = answer(other_model, other_tokenizer, questions, task.max_new_tokens, task.batch_size,
                        task.system_prompt)
    judgements = judge_pairs(judge, questions, answers, others)
    return pairwise_result(judgements, judge.name, task.examples, task.resamples, task.seed)
