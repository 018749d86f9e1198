"""A model as judge: strict verdict parsing, both orders, the statistics, local and endpoint judges, the task kind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.judge import (
    LocalJudge,
    combine_orders,
    grade_answers,
    judge_pairs,
    pair_messages,
    parse_grade,
    parse_pair_verdict,
)
from tunesmith.evaluation.judge_stats import (
    bootstrap_interval,
    length_controlled_win_rate,
    order_agreement,
    summarise_pairs,
    win_rate,
)
from tunesmith.evaluation.tasks import parse_task

QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello."]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from tunesmith.inference.generate import load_for_inference

    return load_for_inference(tiny_llama)


def test_verdicts_parse_strictly():
    assert parse_pair_verdict("A is more helpful. [[A]]") == "A"
    assert parse_pair_verdict("Tie: [[C]]") == "C"
    assert parse_pair_verdict("[[B]] ... final verdict [[B]]") == "B"  # repeated, one distinct
    for text in ("[[A]] or [[B]]", "A", "[A]", "[[ A ]]", "[[D]]", "", "verdict: [[a]]"):
        assert parse_pair_verdict(text) is None, text
    assert parse_grade("Rating: [[7]]") == 7.0 and parse_grade("[[8.5]]") == 8.5 and parse_grade("[[10]]") == 10.0
    for text in ("Rating: 7", "[[0]]", "[[11]]", "[[3]] then [[4]]", "[[seven]]"):
        assert parse_grade(text) is None, text


def test_both_orders_combine_to_a_tie_when_they_disagree():
    assert combine_orders("win", "win") == ("win", True)
    assert combine_orders("loss", "loss") == ("loss", True)
    assert combine_orders("tie", "tie") == ("tie", True)
    assert combine_orders("win", "loss") == ("tie", False)  # position bias: each order picked the first answer
    assert combine_orders("win", "tie") == ("tie", False)
    assert combine_orders(None, "win") == ("invalid", None)


def test_win_rate_interval_and_agreement_golden():
    outcomes = ["win"] * 6 + ["loss"] * 2 + ["tie"] * 2 + ["invalid"]
    assert win_rate(outcomes) == pytest.approx(7 / 10)
    low, high = bootstrap_interval([1.0] * 6 + [0.0] * 2 + [0.5] * 2, resamples=2000, seed=0)
    assert low < 0.7 < high and 0.35 < low and high <= 1.0
    assert bootstrap_interval([1.0, 0.0], seed=3) == bootstrap_interval([1.0, 0.0], seed=3)  # reproducible
    assert order_agreement([True, True, False, None]) == pytest.approx(2 / 3)
    summary = summarise_pairs(outcomes, [True] * 11, [10] * 11, [10] * 11)
    assert (summary["wins"], summary["losses"], summary["ties"], summary["invalid"]) == (6, 2, 2, 1)


def test_length_controlled_win_rate_equals_a_reference_fit():
    """The Newton fit equals scipy's minimiser of the same penalised cross-entropy; length explains wins away."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    outcomes = ["win", "win", "win", "loss", "tie", "win", "loss", "win", "loss", "tie"]
    lengths_a = [300, 250, 280, 90, 150, 400, 100, 220, 120, 160]
    lengths_b = [100, 120, 100, 140, 150, 90, 160, 130, 110, 150]
    ours = length_controlled_win_rate(outcomes, lengths_a, lengths_b)

    y = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]
    d = [a - b for a, b in zip(lengths_a, lengths_b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / len(d))
    x = [math.tanh(v / sd) for v in d]

    def loss(params):
        b0, b1 = params
        total = 0.0
        for xi, yi in zip(x, y):
            p = 1 / (1 + math.exp(-(b0 + b1 * xi)))
            total -= yi * math.log(p) + (1 - yi) * math.log(1 - p)
        return total + 0.5e-4 * b0 ** 2 + 0.5e-2 * b1 ** 2

    fit = scipy_optimize.minimize(loss, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10})
    assert ours == pytest.approx(1 / (1 + math.exp(-fit.x[0])), abs=1e-6)
    assert ours < win_rate(outcomes)  # the tuned answers won mostly by being longer
    same_length = length_controlled_win_rate(outcomes, [100] * 10, [100] * 10)
    assert same_length == pytest.approx(win_rate(outcomes), abs=1e-3)


@pytest.mark.slow
def test_local_logprob_judge_reads_the_most_likely_verdict(tiny):
    """logprob verdicts equal the argmax of the judge's own log-probabilities, computed here by hand."""
    import torch

    from tunesmith.inference.generate import render_prompt

    model, tokenizer = tiny
    judge = LocalJudge(model, tokenizer, "tiny", "logprob")
    judgements = judge_pairs(judge, QUESTIONS[:2], ["4", "blue"], ["five, I think", "a colour is a colour"])
    answers_a, answers_b = ["4", "blue"], ["five, I think", "a colour is a colour"]
    for judgement, question, a, b in zip(judgements, QUESTIONS, answers_a, answers_b):
        for messages, raw, parsed in zip(judgement.prompts, judgement.raw, judgement.parsed):
            context = render_prompt(tokenizer, messages) + "[["
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            totals = {}
            for option in "ABC":
                ids = tokenizer(context + option + "]]", add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
                totals[option] = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))
            assert parsed == max(totals, key=totals.get) and raw.startswith(f"[[{parsed}]]")
        assert judgement.prompts == (pair_messages(question, a, b), pair_messages(question, b, a))
        sides = [{"A": "win", "B": "loss", "C": "tie"}[judgement.parsed[0]],
                 {"B": "win", "A": "loss", "C": "tie"}[judgement.parsed[1]]]
        assert (judgement.outcome, judgement.consistent) == combine_orders(*sides)
    grades = grade_answers(judge, QUESTIONS[:1], ["4"])
    assert grades[0].score in {float(n) for n in range(1, 11)} and "Rating" in grades[0].prompt[0]["content"]


def write_questions(folder: Path) -> Path:
    path = folder / "questions.jsonl"
    rows = [{"question_id": i, "category": "generic", "turns": [q, "and then?"]} for i, q in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_judge_task_pairwise_and_single_through_a_suite(tiny, tiny_llama, tmp_path):
    from tunesmith.evaluation.suite import Suite, run_suite

    model, tokenizer = tiny
    questions = write_questions(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"answer": a}) + "\n" for a in ("4", "red", "hello there, friend")))
    judge = {"model": tiny_llama, "method": "logprob"}
    tasks = (parse_task({"name": "vs_file", "kind": "judge", "path": str(questions), "judge": judge,
                         "against_answers": str(answers), "max_new_tokens": 8}, "t", tmp_path, None),
             parse_task({"name": "vs_self", "kind": "judge", "path": str(questions), "judge": judge,
                         "against": tiny_llama, "max_new_tokens": 8}, "t", tmp_path, None),
             parse_task({"name": "graded", "kind": "judge", "mode": "single", "path": str(questions), "judge": judge,
                         "max_new_tokens": 8, "limit": 2}, "t", tmp_path, None))
    results = run_suite(model, tokenizer, Suite("judged", tasks), progress=None)["tasks"]
    vs_file, vs_self, graded = results["vs_file"], results["vs_self"], results["graded"]
    assert vs_file["metric"] == "win_rate" and vs_file["count"] == 3
    items = vs_file["details"]["items"]
    assert [i["answer_b"] for i in items] == ["4", "red", "hello there, friend"]
    assert items[0]["question"] == QUESTIONS[0]  # MT-Bench layout: the first turn
    assert all(len(i["verdicts"]) == 2 and i["verdicts"][1]["prompt"][1]["content"].count(i["answer_b"]) for i in items)
    metrics = vs_file["metrics"]
    assert metrics["wins"] + metrics["losses"] + metrics["ties"] + metrics["invalid"] == 3
    assert metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
    # the same model on both sides gives the same answers: only position decides, so every outcome is a tie
    assert vs_self["details"]["items"][0]["answer_a"] == vs_self["details"]["items"][0]["answer_b"]
    assert vs_self["score"] == pytest.approx(0.5) and vs_self["metrics"]["ties"] == 3
    assert graded["metric"] == "mean_grade" and graded["count"] == 2 and 1 <= graded["score"] <= 10
    assert len(vs_file["samples"]) == 3 and vs_file["tokenisation"]["judge"] == tiny_llama


def test_judge_task_mistakes_name_the_field(tmp_path):
    with pytest.raises(TunesmithError, match="against"):
        parse_task({"name": "j", "kind": "judge", "path": "q.jsonl", "judge": {"model": "m"}}, "suite.yaml", tmp_path,
                   None)
    with pytest.raises(TunesmithError, match="exactly one of judge.model and judge.endpoint"):
        parse_task({"name": "j", "kind": "judge", "path": "q.jsonl", "judge": {}, "against": "m"}, "s", tmp_path, None)
    with pytest.raises(TunesmithError, match="logprob needs a local judge"):
        parse_task({"name": "j", "kind": "judge", "path": "q.jsonl", "against": "m",
                    "judge": {"endpoint": "http://127.0.0.1:1/v1", "method": "logprob"}}, "s", tmp_path, None)


@pytest.mark.slow
def test_endpoint_judge_on_tunesmith_serve_equals_the_local_judge(tiny, tiny_llama, tmp_path):
    """A real ``tunesmith serve`` on 127.0.0.1 as the judge: its verdicts equal the same model judging locally."""
    from tunesmith.evaluation.judge import EndpointJudge

    from serve_support import Server

    model, tokenizer = tiny
    (tmp_path / "workspace").mkdir()
    server = Server(tmp_path / "workspace", "--model", f"judge={tiny_llama}").start()
    try:
        remote = EndpointJudge(server.url + "/v1", "judge", max_tokens=12)
        judgements = judge_pairs(remote, QUESTIONS[:2], ["4", "blue"], ["five", "red"])
    finally:
        server.stop()
    local = judge_pairs(LocalJudge(model, tokenizer, "tiny", "generate", max_new_tokens=12), QUESTIONS[:2],
                        ["4", "blue"], ["five", "red"])
    assert [j.raw for j in judgements] == [j.raw for j in local]
    assert all(j.raw[0] for j in judgements)  # real text came back
    assert [j.outcome for j in judgements] == [j.outcome for j in local]
    with pytest.raises(TunesmithError, match="did not answer"):
        EndpointJudge(server.url + "/v1", "judge", timeout=2).verdicts([pair_messages("q", "a", "b")], "ABC")


def test_report_shows_win_rate_interval_and_example_pairs(tmp_path):
    """Verdict texts -> task result -> report.html: the win rate, its interval, the controlled rate, example pairs."""
    from tunesmith.evaluation.judge import PairJudgement
    from tunesmith.evaluation.judge_task import pairwise_result
    from tunesmith.evaluation.report import render_report
    from tunesmith.evaluation.results import new_document, run_entry

    verdicts = [("[[A]]", "[[B]]"), ("[[A]]", "[[A]]"), ("[[C]]", "[[C]]"), ("no verdict", "[[B]]")]
    judgements = []
    for index, raw in enumerate(verdicts):
        parsed = (parse_pair_verdict(raw[0]), parse_pair_verdict(raw[1]))
        sides = [None if parsed[0] is None else {"A": "win", "B": "loss", "C": "tie"}[parsed[0]],
                 None if parsed[1] is None else {"B": "win", "A": "loss", "C": "tie"}[parsed[1]]]
        outcome, consistent = combine_orders(*sides)
        judgements.append(PairJudgement(f"question {index}", "tuned <b>answer</b>" * (index + 1), "base answer",
                                        (pair_messages("q", "a", "b"), pair_messages("q", "b", "a")), raw, parsed,
                                        outcome, consistent))
    result = {"name": "vs_base", **pairwise_result(judgements, "smollm2", examples=2), "seconds": 1.0}
    assert [j.outcome for j in judgements] == ["win", "tie", "tie", "invalid"]
    assert result["score"] == pytest.approx(2 / 3) and result["metrics"]["order_agreement"] == pytest.approx(2 / 3)
    document = new_document({"tuned": run_entry("m", None, None, {"judged": {"file": "", "role": "task",
                                                                             "tasks": {"vs_base": result}}})})
    page = render_report(document)
    assert "win rate <b>0.667</b>" in page and "length-controlled" in page and "1 invalid verdicts" in page
    assert page.count("question 0") == 1 and "question 2" not in page  # two example pairs
    assert "tuned &lt;b&gt;answer&lt;/b&gt;" in page  # answers are escaped
