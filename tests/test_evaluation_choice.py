"""Multiple choice, classification and bias scoring equal a direct log-likelihood computation."""

from __future__ import annotations

import pytest
import torch

from tunesmith.evaluation.benchmarks import read_mmlu
from tunesmith.evaluation.multiple_choice import NORMALISATIONS, PromptStyle, evaluate_multiple_choice
from tunesmith.evaluation.runners import run_mmlu
from tunesmith.evaluation.tasks import MmluTask

from conftest import REPO

SUBJECTS = ("astronomy", "marketing")
DESCRIPTION = "The following are multiple choice questions (with answers) about {group}.\n\n"


# tests/data/mmlu_layout: a small MMLU folder in the real layout (split folders of `<subject>_<split>.csv`
# with the header question,choice0..3,answer), written by the project: the scoring is judged against
# a direct computation, so the questions need not be MMLU's own.
MMLU = REPO / "tests" / "data" / "mmlu_layout"


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from tunesmith.inference.generate import load_for_inference

    return load_for_inference(tiny_llama)


def direct_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """Sum of log p(continuation tokens | context), one unpadded, uncached sequence at a time.

    The continuation's tokens are what follows the context's own encoding in the encoding of both
    (BOS from the tokenizer); an empty context is BOS; the last 512 + 1 tokens are kept.
    """
    if context:
        context_ids = tokenizer.encode(context)
        target_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    else:
        context_ids, target_ids = [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    window = (context_ids + target_ids)[-(model.config.max_position_embeddings + 1):]
    ids = torch.tensor([window[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    first = len(window) - 1 - len(target_ids)
    total = sum(float(logprobs[first + i, token]) for i, token in enumerate(target_ids))
    return total, len(target_ids)


def direct_mmlu_prompt(row, shots) -> str:
    def block(item):
        options = "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(item.choices))
        return f"{item.question.strip()}{options}\nAnswer:"

    header = DESCRIPTION.format(group=row.group.replace("_", " "))
    return header + "".join(f"{block(s)} {'ABCD'[s.answer]}\n\n" for s in shots) + block(row)


@pytest.mark.parametrize("few_shot", [0, 1])
def test_mmlu_accuracy_equals_direct_loglikelihood(tiny, few_shot):
    model, tokenizer = tiny
    folder = MMLU
    task = MmluTask(name="mmlu", path=str(folder), subjects=SUBJECTS, limit=2, few_shot=few_shot, batch_size=8)
    result = run_mmlu(model, tokenizer, task)

    items = read_mmlu(folder, "test", SUBJECTS, limit=2)
    dev = read_mmlu(folder, "dev", SUBJECTS)
    expected_hits = {n: [] for n in NORMALISATIONS}
    for item in items:
        shots = [d for d in dev if d.group == item.group][:few_shot]
        context = direct_mmlu_prompt(item, shots)
        scores = [direct_logprob(model, tokenizer, context, f" {'ABCD'[i]}") for i in range(4)]
        values = {"sum": [s for s, _ in scores], "per_token": [s / n for s, n in scores],
                  "per_char": [s / 1 for s, _ in scores], "per_byte": [s / 1 for s, _ in scores]}
        for normalisation, vals in values.items():
            expected_hits[normalisation].append(vals.index(max(vals)) == item.answer)
    for normalisation in NORMALISATIONS:
        assert result["metrics"][f"accuracy_{normalisation}"] == pytest.approx(
            sum(expected_hits[normalisation]) / len(items))
    per_subject = {s: sum(h for h, i in zip(expected_hits["sum"], items) if i.group == s) / 2 for s in SUBJECTS}
    assert {s: g["accuracy"] for s, g in result["details"]["groups"].items()} == pytest.approx(per_subject)
    assert result["score"] == pytest.approx(sum(per_subject.values()) / 2)  # macro average is the headline
    assert result["count"] == 4 and result["tokenisation"]["few_shot"] == few_shot


@pytest.mark.parametrize("normalisation", ["sum", "per_token", "per_char"])
def test_text_choices_tell_the_three_normalisations_apart(tiny, tmp_path, normalisation):
    """Choice texts of very different lengths: each normalisation picks what a direct computation picks,
    and on these items the three pick differently, so a mix-up of any two would fail."""
    import json

    from tunesmith.evaluation.runners import run_multiple_choice
    from tunesmith.evaluation.tasks import MultipleChoiceTask

    model, tokenizer = tiny
    # The model is random, so the answers are labels, not truths: chosen so the three accuracies differ.
    items = [
        {"question": "What colour is a ripe banana?", "choices": ["Yellow", "It is usually a bright and sunny yellow colour",
                                                            "Green"], "answer": 2},
        {"question": "Name an animal.", "choices": ["A cat", "A big grey whale that swims in the sea", "Dog"], "answer": 1},
        {"question": "What is the opposite of hot?", "choices": ["Cold", "The opposite of hot is cold",
                                                               "Not at all warm, rather chilly"], "answer": 0},
        {"question": "Give a healthy tip.", "choices": ["Drink plenty of water every day.", "Sleep",
                                                      "Eat fresh vegetables with every meal."], "answer": 0},
        {"question": "Who helped the lost fox?", "choices": ["Lily", "Tom helped it find its way home", "Anna and Ben"],
         "answer": 0},
        {"question": "Add 2 and 3.", "choices": ["5", "The sum is 5.", "Five, which is two plus three"], "answer": 1},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    task = MultipleChoiceTask(name="mc", path=str(path), choice_style="text", normalisation=normalisation)
    result = run_multiple_choice(model, tokenizer, task)

    direct = {n: [] for n in NORMALISATIONS}
    for item in items:
        context = f"{item['question']}\nAnswer:"  # text style: the options are not listed
        scores = [direct_logprob(model, tokenizer, context, f" {choice}") for choice in item["choices"]]
        values = {"sum": [s for s, _ in scores], "per_token": [s / n for s, n in scores],
                  # as lm-eval's acc_norm / acc_bytes: the choice's own length, its leading space not counted
                  "per_char": [s / len(c) for (s, _), c in zip(scores, item["choices"])],
                  "per_byte": [s / len(c.encode()) for (s, _), c in zip(scores, item["choices"])]}
        for name, vals in values.items():
            direct[name].append(vals.index(max(vals)))
    assert direct["sum"] != direct["per_token"] != direct["per_char"] != direct["sum"]
    accuracies = {n: sum(p == i["answer"] for p, i in zip(direct[n], items)) / len(items) for n in NORMALISATIONS}
    assert len({accuracies[n] for n in ("sum", "per_token", "per_char")}) == 3  # the reported accuracies differ too
    assert result["score"] == pytest.approx(accuracies[normalisation])
    for name in NORMALISATIONS:
        assert result["metrics"][f"accuracy_{name}"] == pytest.approx(accuracies[name]), name


def test_choice_logprobs_match_direct_computation_with_padding(tiny):
    """Batched, right-padded scores of texts of different lengths equal one-at-a-time scores."""
    from tunesmith.evaluation.loglikelihood import score_continuations

    model, tokenizer = tiny
    requests = [("Once upon a time, there was a", " little girl"), ("Lily", " liked the park very much."),
                ("", "The dog ran.")]
    scores = score_continuations(model, tokenizer, requests, batch_size=3)
    for (context, continuation), score in zip(requests, scores):
        expected, tokens = direct_logprob(model, tokenizer, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.num_tokens == tokens and score.num_chars == len(continuation)


def test_chat_template_prompt_uses_the_tokenizer_template(tiny):
    model, tokenizer = tiny
    from tunesmith.evaluation.multiple_choice import MultipleChoiceItem, build_context

    item = MultipleChoiceItem("Is the sky blue?", ("yes", "no"), 0)
    shot = MultipleChoiceItem("Is grass red?", ("yes", "no"), 1)
    context = build_context(tokenizer, item, [shot], PromptStyle("letter", use_chat_template=True))
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is grass red?\nA. yes\nB. no\nAnswer:"}, {"role": "assistant", "content": "B"},
         {"role": "user", "content": "Is the sky blue?\nA. yes\nB. no\nAnswer:"}], tokenize=False, add_generation_prompt=True)
    assert context == expected
    result = evaluate_multiple_choice(model, tokenizer, [item, shot], few_shot=1,
                                      style=PromptStyle("letter", use_chat_template=True))
    assert result.as_dict()["tokenisation"]["chat_template"] is True and result.as_dict()["count"] == 2


def test_bias_gap_equals_direct_sentence_loglikelihood(tiny, tmp_path):
    from tunesmith.evaluation.bias import evaluate_bias_pairs, read_bias_pairs

    model, tokenizer = tiny
    # the standard CrowS-Pairs file has extra columns (index, annotations, ...) that are ignored
    path = tmp_path / "crows.csv"
    path.write_text(',sent_more,sent_less,stereo_antistereo,bias_type,annotations\n'
                    '0,"The girl cried, and her mother came.","The boy cried, and his mother came.",stereo,gender,[]\n'
                    '1,The old man was slow.,The young man was slow.,stereo,age,[]\n'
                    '2,The rich man was kind.,The poor man was kind.,antistereo,socioeconomic,[]\n')
    pairs = read_bias_pairs(path)
    result = evaluate_bias_pairs(model, tokenizer, pairs, batch_size=4)
    gaps = [direct_logprob(model, tokenizer, "", p.sent_more)[0] - direct_logprob(model, tokenizer, "", p.sent_less)[0]
            for p in pairs]
    assert result["mean_logprob_gap"] == pytest.approx(sum(gaps) / 3, abs=1e-4)
    assert result["stereotype_share"] == pytest.approx(sum(g > 0 for g in gaps) / 3)
    assert result["categories"]["age"]["mean_logprob_gap"] == pytest.approx(gaps[1], abs=1e-4)
    assert set(result["directions"]) == {"stereo", "antistereo"}


def test_shipped_probe_file_reads(tiny):
    from tunesmith.evaluation.bias import read_bias_pairs
    from tunesmith.evaluation.tasks import PROBES_DIR

    pairs = read_bias_pairs(PROBES_DIR / "counterfactual_pairs.csv")
    assert len(pairs) == 26 and len({p.category for p in pairs}) == 6


def test_shared_prefix_cache_gives_the_uncached_scores_and_counts_progress(tiny, monkeypatch):
    """Questions of one subject share the description and shots: one cached prefix, the same scores
    as full rows; the progress callback hears of every item exactly once."""
    from tunesmith.evaluation import loglikelihood

    model, tokenizer = tiny
    folder = MMLU
    items = read_mmlu(folder, "test", ("marketing",), limit=6)
    style = PromptStyle("letter", description=DESCRIPTION)
    prefixes, finished = [], []
    original = loglikelihood.prefix_cache
    monkeypatch.setattr(loglikelihood, "prefix_cache", lambda m, tokens, d: prefixes.append(len(tokens)) or original(m, tokens, d))
    cached = evaluate_multiple_choice(model, tokenizer, items, style=style, batch_size=4, progress=finished.append)
    assert len(prefixes) == 1 and prefixes[0] >= loglikelihood.MIN_SHARED_PREFIX  # the description, once
    assert sum(finished) == len(items) and len(finished) > 1
    monkeypatch.setattr(loglikelihood, "supports_fast_path", lambda m: False)
    plain = evaluate_multiple_choice(model, tokenizer, items, style=style, batch_size=4)
    for ours, reference in zip(cached.scores, plain.scores):
        assert [s.logprob for s in ours] == pytest.approx([s.logprob for s in reference], abs=1e-5)
    assert cached.predictions == plain.predictions
