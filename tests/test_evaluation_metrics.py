"""Generation metrics equal the reference libraries' own numbers on the same strings."""

from __future__ import annotations

import pytest

from tunesmith.evaluation.metrics import (
    compute_metrics,
    exact_match_score,
    extract_answer,
    extraction_accuracy,
    token_f1,
    token_f1_score,
)

PREDICTIONS = ["the cat sat on the mat", "a quick brown dog jumps", "It rained all day.\nThe river rose."]
REFERENCES = [["the cat is on the mat", "there is a cat on the mat"],
              ["the quick brown fox jumps over the lazy dog"],
              ["It rained the whole day.\nThe river rose fast.", "Rain all day; the river rose."]]


@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
def test_rouge_equals_rouge_score(rouge_type):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([rouge_type])
    expected = sum(max(scorer.score(ref, pred)[rouge_type].fmeasure for ref in refs)
                   for pred, refs in zip(PREDICTIONS, REFERENCES)) / len(PREDICTIONS)
    values, tokenisation = compute_metrics([rouge_type], PREDICTIONS, REFERENCES)
    assert values[rouge_type] == pytest.approx(expected, abs=1e-12)
    assert 0 < values[rouge_type] < 1 and "rouge-score" in tokenisation[rouge_type]


def test_bleu_and_chrf_equal_sacrebleu_with_a_missing_second_reference():
    import sacrebleu

    streams = [[refs[0] for refs in REFERENCES], [refs[1] if len(refs) > 1 else None for refs in REFERENCES]]
    values, _ = compute_metrics(["bleu", "chrf"], PREDICTIONS, REFERENCES)
    assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score, abs=1e-9)
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, streams).score, abs=1e-9)
    one_reference, _ = compute_metrics(["bleu"], PREDICTIONS, [[refs[0]] for refs in REFERENCES])
    assert one_reference["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [streams[0]]).score, abs=1e-9)
    assert values["bleu"] != one_reference["bleu"]  # the second references count


def test_exact_match_and_token_f1_golden_values():
    assert exact_match_score([" Paris ", "paris"], [["Paris"], ["Paris", "Lyon"]]) == 0.5
    # prediction "cat sat mat" vs "cat is on mat" after dropping 'the': 2 common, P=2/3, R=2/4
    assert token_f1("The cat sat, the mat.", "the cat is on the mat") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert token_f1_score(["blue"], [["red", "Blue!"]]) == 1.0
    assert token_f1("", "") == 1.0 and token_f1("a", "b") == 0.0


def test_gsm8k_answer_extraction():
    pattern = r"#### (\S+)"
    assert extract_answer("so she earns 9 * 2 = 18 dollars.\n#### 18", pattern) == "18"
    assert extract_answer("The answer is $1,234.", pattern) == "1234"  # falls back to the last number
    assert extract_answer("no number here", pattern) is None
    predictions = ["The total is 18.", "#### 7", "I think 5"]
    references = [["... #### 18"], ["... #### 8"], ["#### 5"]]
    assert extraction_accuracy(predictions, references, pattern) == pytest.approx(2 / 3)


def test_grpo_reward_and_evaluation_accuracy_agree_on_the_same_text():
    """One extraction (tunesmith.data.answers) behind both: the same text gets the same verdict."""
    from tunesmith.config.rewards import GSM8K_ANSWER
    from tunesmith.stages.rewards import answer_match

    reference = "48 + 24 = 72\n#### 72"
    texts = ["#### 72", "#### 72.0", "the answer is 72.", "#### 1,072", "$72", "#### 71\n#### 72", "no idea", "#### 7 2"]
    rewards = answer_match(GSM8K_ANSWER)([""] * len(texts), texts, [reference] * len(texts), [0] * len(texts))
    accuracy = [extraction_accuracy([text], [[reference]], GSM8K_ANSWER) for text in texts]
    assert rewards == accuracy == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_unknown_metric_lists_valid_ones():
    from tunesmith.core.errors import TunesmithError

    with pytest.raises(TunesmithError, match="unknown metric 'rogue1'.*Did you mean 'rouge1'"):
        compute_metrics(["rogue1"], ["a"], [["a"]])
