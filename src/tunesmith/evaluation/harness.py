"""Bridge to lm-evaluation-harness (optional extra ``tunesmith[lm-eval]``): its tasks on our loaded model.

The model (base, or base + adapter, as loaded by tunesmith) is handed to lm-eval's ``HFLM``
wrapper as an object, so adapters and the saved chat template come along; lm-eval does the
prompting, tokenisation and scoring of its own tasks, including local task YAMLs named through
``include_path``.
"""

from __future__ import annotations

from typing import Any

from tunesmith.core.errors import TunesmithError
from tunesmith.evaluation.benchmarks import mmlu_subject_files
from tunesmith.evaluation.results import task_result
from tunesmith.evaluation.tasks import LmEvalTask


def run_harness_tasks(model, tokenizer, task: LmEvalTask) -> dict[str, Any]:
    """Run ``task.tasks`` with lm-eval and return them in tunesmith's common task-result form.

    Metrics are named ``<lm-eval task>/<metric>`` (filters other than ``none`` are appended);
    the headline is the first metric of the first task.

    Raises:
        TunesmithError: If lm-eval is not installed.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TunesmithError("task kind 'lm_eval' needs lm-evaluation-harness: pip install 'tunesmith[lm-eval]'") from None

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=task.batch_size)
    manager = TaskManager(include_path=task.include_path) if task.include_path else TaskManager()
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(task.tasks), num_fewshot=task.num_fewshot,
                                     limit=task.limit, task_manager=manager, apply_chat_template=task.chat_template)
    metrics: dict[str, float] = {}
    for task_name in task.tasks:
        for key, value in output["results"].get(task_name, {}).items():
            name, _, filter_name = key.partition(",")
            if "_stderr" in name or name == "sample_len" or not isinstance(value, (int, float)):
                continue
            metrics[f"{task_name}/{name}" + ("" if filter_name in ("", "none") else f"@{filter_name}")] = float(value)
    if not metrics:
        raise TunesmithError(f"lm-eval returned no metrics for {', '.join(task.tasks)}")
    count = sum(int(n.get("effective", n.get("original", 0))) for n in output.get("n-samples", {}).values())
    tokenisation = {"method": "lm-evaluation-harness's own (HFLM)", "lm_eval_version": lm_eval.__version__,
                    "chat_template": task.chat_template}
    return task_result("lm_eval", next(iter(metrics)), metrics, count, tokenisation=tokenisation)


MMLU_DOC_TO_TEXT = ("{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\nD. {{choice3}}\nAnswer:")


def write_mmlu_task_yamls(folder, out_dir, subjects, split: str = "test", few_shot_split: str = "dev",
                          prefix: str = "tunesmith_mmlu_") -> list[str]:
    """lm-eval task YAMLs reading tunesmith's MMLU CSV layout, with lm-eval's own MMLU prompt.

    The same request as lm-eval's ``mmlu_<subject>`` (description, ``question.strip()``, lettered
    options, ``Answer:``, continuations " A".." D", the first dev rows as shots), over local files, so
    the two tools can be compared on the same documents. ``na_filter: false`` keeps choices such as
    "None" as text; pandas still reads a column of numbers only as numbers (none of the usual subjects).

    Returns:
        The task names, ``prefix + subject``; pass ``out_dir`` as lm-eval's ``include_path``.
    """
    from pathlib import Path

    import yaml


    folder, out_dir = Path(folder).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = mmlu_subject_files(folder, split, tuple(subjects))
    shots = mmlu_subject_files(folder, few_shot_split, tuple(subjects))
    names = []
    for subject in subjects:
        about = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {about}.\n\n"
        task = {"task": prefix + subject, "dataset_path": "csv",
                "dataset_kwargs": {"data_files": {"test": str(tests[subject]), "dev": str(shots[subject])},
                                   "na_filter": False},
                "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
                "output_type": "multiple_choice",
                "description": description,
                "doc_to_text": MMLU_DOC_TO_TEXT, "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
        (out_dir / f"{prefix}{subject}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        names.append(prefix + subject)
    return names


def harness_documents(model, tokenizer, tasks, include_path, num_fewshot: int = 0, limit=None,
                      batch_size: int = 16) -> dict[str, list[dict]]:
    """lm-eval's per-document results: ``{task: [{"doc_id", "context", "continuations", "logprobs",
    "acc", "acc_norm"}]}`` in document order (for comparisons with tunesmith's own scoring)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                     task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
                                     log_samples=True,
                                     bootstrap_iters=0)
    documents = {}
    for task in tasks:
        samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
        documents[task] = [{"doc_id": s["doc_id"], "context": s["arguments"][0][0],
                            "continuations": [a[1] for a in s["arguments"]],
                            "logprobs": [float(r[0][0]) for r in s["resps"]],
                            "acc": s.get("acc"), "acc_norm": s.get("acc_norm")} for s in samples]
    return documents
