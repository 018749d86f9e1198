"""Bridge to lm-evaluation-harness (optional extra ``tunesmith[lm-eval]``): its tasks on our loaded model.

The model (base, or base + adapter, as loaded by tunesmith) is handed to lm-eval's ``HFLM``
wrapper as an object, so adapters and the saved chat template come along; lm-eval does the
prompting, tokenisation and scoring of its own tasks, including local task YAMLs named through
``include_path``.
"""

from __future__ import annotations

from typing import Any

from tunesmith.errors import TunesmithError
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
