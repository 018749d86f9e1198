"""The lm-evaluation-harness bridge on a local task YAML (skipped when lm-eval is not installed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'tunesmith[lm-eval]'")

ITEMS = [{"question": "Lily went to the", "choices": ["park", "moon"], "answer": 0},
         {"question": "The cat said", "choices": ["seven", "meow"], "answer": 1},
         {"question": "Tom had a big red", "choices": ["ball", "idea"], "answer": 0}]


@pytest.mark.slow
def test_local_lm_eval_task_matches_our_multiple_choice(tmp_path, monkeypatch, tiny_llama):
    from tunesmith.evaluation.multiple_choice import MultipleChoiceItem, PromptStyle, evaluate_multiple_choice
    from tunesmith.evaluation.suite import Suite, run_suite
    from tunesmith.evaluation.tasks import LmEvalTask
    from tunesmith.inference.generate import load_for_inference

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    model, tokenizer = load_for_inference(tiny_llama)
    task = LmEvalTask(name="harness", tasks=("tiny_choice",), include_path=str(tmp_path))
    result = run_suite(model, tokenizer, Suite("s", (task,)), progress=None)["tasks"]["harness"]
    assert result["metric"] == "tiny_choice/acc" and result["count"] == 3

    items = [MultipleChoiceItem(i["question"], tuple(i["choices"]), i["answer"]) for i in ITEMS]
    ours = evaluate_multiple_choice(model, tokenizer, items, style=PromptStyle("text"))
    assert result["score"] == pytest.approx(ours.accuracy())
