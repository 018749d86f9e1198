"""tunesmith's generation scoring equals lm-evaluation-harness 0.4's ``generate_until`` scoring, per document.

Two ways of giving both tools the same replies:

* a canned model: an lm-eval ``LM`` whose ``generate_until`` returns each document's ``reply`` field
  (replies written to hit the edge cases of GSM8K's strict-match and flexible-extract filters, of
  exact_match's normalisation options and of ROUGE), and tunesmith's :func:`score_documents` fed the
  same replies;
* a real model: lm-eval's ``HFLM`` and tunesmith's generation task greedy-decode on the tests' tiny Llama
  (random weights: the comparison needs the same replies, not good ones) with a stop string, and each document's filtered answers and scores are compared.

lm-eval runs local task YAMLs over local JSONL files (its GSM8K filters and metric options copied
from its ``gsm8k.yaml``; ROUGE through its own ``cnn_dailymail`` ``process_results``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunesmith.evaluation.filters import score_documents
from tunesmith.evaluation.tasks import GenerationTask

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'tunesmith[lm-eval]')")

GSM8K_FILTERS = [
    {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                        {"function": "take_first"}]},
    {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                             "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                            {"function": "take_first"}]},
]
GSM8K_EXACT_MATCH = {"ignore_case": True, "ignore_punctuation": False,
                     "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}

GSM8K_DOCS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "reply": "48 + 24 = 72 clips.\n#### 72"},
    {"question": "A shirt costs $1,200 and a hat $34. Total?", "answer": "1200 + 34 = 1234\n#### 1,234",
     "reply": "The total is $1,234."},
    {"question": "How many legs do 4 cats have?", "answer": "4 * 4 = 16\n#### 16", "reply": "#### 16.\n#### 17"},
    {"question": "Tim has 3 apples and eats 5. How many are left?", "answer": "3 - 5 = -2\n#### -2",
     "reply": "He has -2 apples, or 7 pears"},
    {"question": "What is 9 times 2?", "answer": "#### 18", "reply": "I do not know."},
    {"question": "Halve 7.", "answer": "7 / 2 = 3.5\n#### 3.5", "reply": "#### 3.5 #### 3.50"},
    {"question": "Add 1,000 and 1.", "answer": "#### 1001", "reply": "It is 1,001"},
]
TEXT_DOCS = [
    {"question": "Capital of France?", "answer": "Paris", "reply": " paris."},
    {"question": "Colour of the sky?", "answer": "Blue", "reply": "The sky is blue!"},
    {"question": "Say hello.", "answer": "Hello, world", "reply": "hello world"},
    {"question": "Year?", "answer": "Year 2024", "reply": "year 1999"},
]
SUMMARY_DOCS = [
    {"article": "The cat sat on the mat all day and did not move.", "highlights": "A cat stayed on the mat all day.",
     "reply": "The cats were sitting on mats all day long."},
    {"article": "Rain fell over the city, flooding the streets.", "highlights": "Heavy rain flooded the city streets.",
     "reply": "Streets flooded as heavy rains fell over the city."},
    {"article": "A new bridge opened.", "highlights": "The bridge opened on Monday.", "reply": "Nothing happened."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def lm_eval_task(folder: Path, name: str, data: Path, **fields) -> None:
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "generate_until", **fields}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def run_lm_eval(model, folder: Path, name: str, **options) -> dict[str, list[dict]]:
    """lm-eval's logged samples per filter, each list in document order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    output = lm_eval.simple_evaluate(model=model, tasks=[name], log_samples=True, bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                     **options)
    by_filter: dict[str, list[dict]] = {}
    for sample in output["samples"][name]:
        by_filter.setdefault(sample["filter"], []).append(sample)
    return {f: sorted(samples, key=lambda s: s["doc_id"]) for f, samples in by_filter.items()}


def canned_model():
    """An lm-eval model that replies with each document's ``reply`` field (no generation at all)."""
    from lm_eval.api.model import LM

    class Canned(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            return [request.doc["reply"] for request in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return Canned()


def assert_same_documents(task: GenerationTask, replies: list[str], references: list[list[str]],
                          theirs: dict[str, list[dict]], metrics: tuple[str, ...]) -> None:
    _, documents = score_documents(task, replies, references)
    assert set(theirs) == {p.name for p in task.filter_list} or (not task.filter_list and set(theirs) == {"none"})
    for filter_name, samples in theirs.items():
        assert len(samples) == len(documents) and all(metric in s for s in samples for metric in metrics)
        for document, sample in zip(documents, samples):
            filtered = sample["filtered_resps"]
            assert document["filtered"][filter_name] == (filtered[0] if isinstance(filtered, list) else filtered)
            for metric in metrics:
                key = metric if filter_name == "none" else f"{metric}@{filter_name}"
                assert document["scores"][key] == pytest.approx(float(sample[metric]), abs=1e-12), (filter_name, key)


def test_gsm8k_filters_and_exact_match_equal_lm_eval_per_document(tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_DOCS)
    lm_eval_task(tmp_path, "ts_gsm", data, doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{answer}}",
                 metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                               **GSM8K_EXACT_MATCH}],
                 filter_list=GSM8K_FILTERS, generation_kwargs={"until": ["Question:"], "do_sample": False})
    theirs = run_lm_eval(canned_model(), tmp_path, "ts_gsm")
    task = GenerationTask(name="gsm", path=str(data), metrics=("exact_match",), filter_list=GSM8K_FILTERS,
                          exact_match_options=GSM8K_EXACT_MATCH)
    replies, references = [d["reply"] for d in GSM8K_DOCS], [[d["answer"]] for d in GSM8K_DOCS]
    assert_same_documents(task, replies, references, theirs, ("exact_match",))
    metrics, documents = score_documents(task, replies, references)
    # the replies tell the two filters apart, and both fall back to [invalid] somewhere
    strict = [d["filtered"]["strict-match"] for d in documents]
    flexible = [d["filtered"]["flexible-extract"] for d in documents]
    assert strict == ["72", "[invalid]", "16.", "[invalid]", "[invalid]", "3.5", "[invalid]"]
    assert flexible == ["72", "$1,234.", "17", "7", "[invalid]", "3.50", "1,001"]
    assert metrics == {"exact_match@strict-match": pytest.approx(3 / 7),
                       "exact_match@flexible-extract": pytest.approx(3 / 7)}


def test_exact_match_options_equal_lm_eval_per_document(tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", TEXT_DOCS)
    options = {"ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": ["^\\s+", "(?i)the sky is "],
               "ignore_numbers": False}
    lm_eval_task(tmp_path, "ts_text", data, doc_to_text="{{question}}", doc_to_target="{{answer}}",
                 metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, **options}],
                 generation_kwargs={"until": ["\n\n"], "do_sample": False})
    theirs = run_lm_eval(canned_model(), tmp_path, "ts_text")
    task = GenerationTask(name="text", path=str(data), exact_match_options=options)
    replies = [d["reply"] for d in TEXT_DOCS]
    assert_same_documents(task, replies, [[d["answer"]] for d in TEXT_DOCS], theirs, ("exact_match",))
    assert [float(s["exact_match"]) for s in theirs["none"]] == [1.0, 1.0, 1.0, 0.0]


def test_summary_rouge_equals_lm_eval_cnn_dailymail_per_document(tmp_path):
    data = write_jsonl(tmp_path / "summaries.jsonl", SUMMARY_DOCS)
    # lm-eval's own process_results of its cnn_dailymail task (ROUGE with the Porter stemmer)
    (tmp_path / "utils.py").write_text("from lm_eval.tasks.cnn_dailymail.utils import process_results  # noqa: F401\n")
    metrics = ("rouge1", "rouge2", "rougeL")
    lm_eval_task(tmp_path, "ts_summary", data,
                 doc_to_text="Summarize the following article:\n\n{{article}}\n\nSummary:",
                 doc_to_target="{{highlights}}", process_results="!function utils.process_results",
                 metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
                 generation_kwargs={"do_sample": False, "max_gen_toks": 16})
    text = (tmp_path / "ts_summary.yaml").read_text().replace("'!function utils.process_results'",
                                                               "!function utils.process_results")
    (tmp_path / "ts_summary.yaml").write_text(text)
    theirs = run_lm_eval(canned_model(), tmp_path, "ts_summary")
    task = GenerationTask(name="summary", path=str(data), prompt="{article}", reference_field="highlights",
                          metrics=metrics, rouge_stemmer=True)
    replies = [d["reply"] for d in SUMMARY_DOCS]
    assert_same_documents(task, replies, [[d["highlights"]] for d in SUMMARY_DOCS], theirs, metrics)
    plain = GenerationTask(name="plain", path=str(data), reference_field="highlights", metrics=("rouge1",))
    _, unstemmed = score_documents(plain, replies, [[d["highlights"]] for d in SUMMARY_DOCS])
    assert unstemmed[0]["scores"]["rouge1"] < float(theirs["none"][0]["rouge1"])  # the stemmer matters here


def test_gsm8k_task_equals_lm_eval_hflm_on_the_tiny_llama(tmp_path, tiny_llama):
    """Same model, same data: lm-eval's HFLM (chat template, a stop string) and tunesmith's generation task."""
    from lm_eval.models.huggingface import HFLM

    from tunesmith.evaluation.generation import generate_for_records
    from tunesmith.inference.generate import load_for_inference

    model, tokenizer = load_for_inference(tiny_llama)
    docs = [{"question": q, "answer": f"#### {n}"} for q, n in (("Lily had 2 dogs and 3 cats.", 5),
                                                                 ("Tom saw 10 birds.", 10),
                                                                 ("Once upon a time, there was a little girl.", 1),
                                                                 ("The sun was hot.", 0))]
    data = write_jsonl(tmp_path / "gsm.jsonl", docs)
    pipelines = [*GSM8K_FILTERS, {"name": "words", "filter": [{"function": "remove_whitespace"},
                                                              {"function": "lowercase"}, {"function": "take_first"}]}]
    lm_eval_task(tmp_path, "ts_gsm_hf", data, doc_to_text="{{question}}", doc_to_target="{{answer}}",
                 metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                               **GSM8K_EXACT_MATCH}],
                 filter_list=pipelines,
                 generation_kwargs={"until": [".", tokenizer.eos_token], "do_sample": False, "max_gen_toks": 24})
    theirs = run_lm_eval(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tmp_path, "ts_gsm_hf",
                         apply_chat_template=True)
    task = GenerationTask(name="gsm", path=str(data), max_new_tokens=24, batch_size=4, until=(".",),
                          filter_list=pipelines, exact_match_options=GSM8K_EXACT_MATCH)
    replies, references, _ = generate_for_records(model, tokenizer, task)
    assert replies == [s["resps"][0][0].strip() for s in theirs["words"]]
    assert sum(len(reply.split()) >= 2 for reply in replies) >= 2  # real replies, cut at the first '.'
    assert_same_documents(task, replies, references, theirs, ("exact_match",))


