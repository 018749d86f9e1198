"""The run's spine: the folder's layout, the typed summary that summary.json holds, the rank-aware reporter."""

from __future__ import annotations

import json

import pytest

from tunesmith.core.reporter import Reporter
from tunesmith.core.run_files import RunLayout, RunSummary
from tunesmith.training.run_folder import RUN_ENTRIES

WRITTEN = {  # a summary.json as finetune() wrote it before RunSummary existed (key order included)
    "steps": 4, "total_steps": 4, "stopped_early": False, "tokens": 1234, "wall_time_s": 1.5, "tokens_per_s": 822.7,
    "peak_memory_mb": 512.0, "train_loss": 6.211, "val_loss": None, "val_perplexity": None,
    "trainable_parameters": 100, "total_parameters": 1000, "method": "lora", "artifact": "/tmp/run/adapter",
    "template": "simple", "world_size": 1, "data": {"train": {"examples": 8}}, "validation": {},
    "task": {"metric": "exact_match", "before": 0.1, "after": 0.5},
}


def test_summary_reads_and_writes_summary_json_byte_for_byte(tmp_path):
    text = json.dumps(WRITTEN, indent=2) + "\n"
    (tmp_path / "summary.json").write_text(text)
    summary = RunSummary.from_file(tmp_path)  # a run folder, or the file itself
    assert summary == RunSummary.from_file(tmp_path / "summary.json")
    assert summary.to_json() == text and dict(summary) == WRITTEN
    assert summary["steps"] == summary.steps == 4 and summary.get("forgetting") is None and "report" not in summary
    assert summary.objective("task") == 0.5 and summary.objective("val_loss") is None
    assert RunLayout(tmp_path).read_summary() == summary and RunLayout(tmp_path / "x").read_summary() is None


def test_layout_names_every_file_a_run_writes(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.metrics == tmp_path / "metrics.jsonl" and layout.config == tmp_path / "config.yaml"
    assert layout.task_before.name == "task_before.json" and layout.report_html == tmp_path / "eval" / "report.html"
    assert layout.entries() == RUN_ENTRIES  # what --overwrite recognises is what a run writes
    assert layout.read_metrics() == [] and layout.saved_result() is None
    layout.metrics.write_text('{"step": 1}\n{"step": 2, "lo')  # a line being written is skipped
    (tmp_path / "adapter").mkdir()
    assert layout.read_metrics() == [{"step": 1}] and layout.saved_result() == tmp_path / "adapter"


def test_reporter_speaks_on_the_main_process_only(capsys):
    Reporter(is_main=True).say("hello")
    Reporter(is_main=False).say("from rank 1")
    Reporter(is_main=False).warn("warning from rank 1")
    Reporter().warn("careful")
    out, err = capsys.readouterr()
    assert out == "hello\n" and err == "careful\n"


def test_finetune_returns_what_summary_json_holds(tiny_recipe, tmp_path):
    from tunesmith.pipeline.finetune import finetune

    summary = finetune(tiny_recipe("train.max_steps=1"), progress=False)
    assert isinstance(summary, RunSummary)
    assert (tmp_path / "run" / "summary.json").read_text() == summary.to_json()
    assert summary.artifact == str(RunLayout(tmp_path / "run").result("adapter"))


@pytest.mark.parametrize("missing", ["task", "forgetting"])
def test_older_summaries_without_optional_blocks_load(tmp_path, missing):
    written = {k: v for k, v in WRITTEN.items() if k != missing}
    (tmp_path / "summary.json").write_text(json.dumps(written))
    assert dict(RunSummary.from_file(tmp_path / "summary.json")) == written
