"""``tunesmith eval``: loss/perplexity on a data file, benchmark suites, or a before/after comparison.

    tunesmith eval --model M [--adapter DIR] --data FILE               # loss and perplexity (JSON to stdout)
    tunesmith eval --model RUN --data FILE         # an rm/dpo/orpo/simpo/kto/cls result: its stage's metrics
    tunesmith eval --model M [--adapter DIR] --suite S.yaml [--out D]  # results.json + report.html
    tunesmith eval --compare BASE TUNED --suite task.yaml --general-suite general.yaml --bias
    tunesmith eval --compare BASE TUNED --data held_out.json   # the held-out file as a task, before -> after
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunesmith.cli.common import add_model_arguments, at_least, load_model_from_args, status
from tunesmith.core.errors import TunesmithError


def register(commands) -> None:
    evaluate = commands.add_parser("eval", help="Loss/perplexity on data, benchmark suites, or base vs tuned report.")
    add_model_arguments(evaluate)
    evaluate.add_argument("--data", help="Data file: loss and perplexity, or the stage's own metrics for an rm, dpo, "
                          "orpo, simpo, kto or cls result (held-out pairs, labelled replies or text/label rows); "
                          "with --compare, a held-out task of the report.")
    evaluate.add_argument("--format", default="auto")
    evaluate.add_argument("--max-length", type=at_least(8), help="Longest token sequence (at least 8; default: the "
                          "run's data.max_length for a stage result, else 1024).")
    evaluate.add_argument("--batch-size", type=at_least(1), default=8)
    evaluate.add_argument("--suite", action="append", default=[],
                          help="Suite file of the task you tuned for (repeatable); see docs/evaluation.md.")
    evaluate.add_argument("--general-suite", action="append", default=[],
                          help="Suite of general skills (repeatable): its change is the forgetting measure.")
    evaluate.add_argument("--bias", action="store_true", help="Also run the counterfactual-pairs bias probe shipped with tunesmith.")
    evaluate.add_argument("--compare", nargs=2, metavar=("BASE", "TUNED"),
                          help="Evaluate BASE and TUNED (a run folder, adapter folder or model) and report the change.")
    evaluate.add_argument("--data-root", help="Folder that {data_root} in task files stands for (your copy of the data).")
    evaluate.add_argument("--limit", type=at_least(1), help="Score at most N items per task (quick look).")
    evaluate.add_argument("--metrics", help="A run's metrics.jsonl for the loss curve (default: TUNED's own).")
    evaluate.add_argument("--out", default="eval", help="Folder for results.json and report.html (default: eval).")
    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.data and not args.compare:
        return cmd_loss(args)
    if not (args.suite or args.general_suite or args.bias or args.data):
        raise TunesmithError("tunesmith eval needs --data FILE, or at least one of --suite, --general-suite, --bias")
    from tunesmith.training.run_folder import writing_into

    with writing_into(Path(args.out)):  # --out inside a run folder (RUN/eval): not while another process writes it
        return _evaluate_and_report(args)


def _evaluate_and_report(args: argparse.Namespace) -> int:
    from tunesmith.evaluation.before_after import ModelSpec, evaluate_and_report, evaluate_before_after, resolve_tuned

    suites = collect_suites(args)
    if args.data:
        suites.append((held_out_suite(args.compare[1], args), "task"))
    out = Path(args.out)
    options = {"dtype": args.dtype, "device": args.device}
    if args.compare:
        base_name, tuned_path = args.compare
        tuned = resolve_tuned(tuned_path, base_name)
        metrics = Path(args.metrics) if args.metrics else None
        document = evaluate_before_after(ModelSpec(base_name), tuned, suites, out, metrics, **options)
        print_comparison(document["comparison"])
    else:
        spec = ModelSpec(args.model, args.adapter)
        evaluate_and_report(spec, suites, out, **options)
    print(f"wrote {out / 'results.json'} and {out / 'report.html'}")
    return 0


def collect_suites(args: argparse.Namespace) -> list:
    """``(suite, role)`` pairs from --suite, --general-suite and --bias."""
    from tunesmith.evaluation.before_after import builtin_bias_suite
    from tunesmith.evaluation.suite import load_suite

    suites = [(load_suite(path, args.data_root, args.limit), "task") for path in args.suite]
    suites += [(load_suite(path, args.data_root, args.limit), "general") for path in args.general_suite]
    suites += [(builtin_bias_suite(), "bias")] if args.bias else []
    names = [suite.name for suite, _ in suites]
    if len(set(names)) != len(names):
        raise TunesmithError(f"suite names must differ; got {', '.join(names)} (set 'name:' in the suite files)")
    return suites


def print_comparison(comparison: dict) -> None:
    def show(value):
        return "n/a" if value is None else f"{value:+.2f}"

    print(f"task gain {show(comparison['task_gain'])} points; general change {show(comparison['general_change'])} "
          f"points; bias change {show(comparison['bias_change'])} points of stereotype share")


def held_out_suite(tuned: str, args: argparse.Namespace):
    """``--data`` under ``--compare``: the stage's metrics for a stage result, else perplexity, as one task."""
    from tunesmith.evaluation.stage_metrics import held_out_task, result_stage
    from tunesmith.evaluation.suite import Suite
    from tunesmith.evaluation.tasks import PerplexityTask

    name = Path(args.data).stem
    judged = result_stage(tuned)
    if judged is not None:
        task = held_out_task(judged, args.data, name, args.batch_size, args.max_length)
    else:
        task = PerplexityTask(name=name, path=args.data, format=args.format, max_length=args.max_length or 1024,
                              batch_size=args.batch_size)
    return Suite("held_out", (task,), args.data)


def cmd_loss(args: argparse.Namespace) -> int:
    from tunesmith.core.runtime import Runtime, pick_device
    from tunesmith.data.encoded import encode_all, load_examples
    from tunesmith.evaluation import evaluate_loss
    from tunesmith.evaluation.stage_metrics import result_stage

    judged = result_stage(args.adapter or args.model)
    if judged is not None:
        return cmd_stage_metrics(args, judged)
    model, tokenizer = load_model_from_args(args)
    examples, _ = load_examples(args.data, args.format)
    encoded, stats = encode_all(examples, tokenizer, args.max_length or 1024, "evaluation")
    runtime = Runtime(device=pick_device(args.device.split(":")[0], setting="--device"))
    status(f"scoring {len(encoded)} records of {args.data} ...")
    metrics = evaluate_loss(model, encoded, args.batch_size, tokenizer.pad_token_id, runtime)
    print(json.dumps({"data": args.data, "examples": len(encoded), **metrics}, indent=2))
    return 0


def cmd_stage_metrics(args: argparse.Namespace, judged) -> int:
    """An rm/dpo/orpo/simpo/kto/cls result on a held-out file: the metrics its stage reports in validation."""
    from tunesmith.evaluation.stage_metrics import held_out_task
    from tunesmith.evaluation.suite import run_task

    model, tokenizer = load_scorer(args)
    status(f"scoring {args.data} as stage {judged.kind} ...")
    result = run_task(model, tokenizer, held_out_task(judged, args.data, Path(args.data).stem, args.batch_size,
                                                      args.max_length))
    print(json.dumps({"data": args.data, "stage": judged.kind, "count": result["count"], **result["metrics"]},
                     indent=2))
    return 0


def load_scorer(args: argparse.Namespace):
    """(model, tokenizer) named by --model/--adapter, with the head an rm or cls result saved."""
    from tunesmith.evaluation.stage_metrics import attach_head
    from tunesmith.inference.results import locate_result

    model, tokenizer = load_model_from_args(args)
    return attach_head(model, locate_result(args.adapter or args.model)), tokenizer
