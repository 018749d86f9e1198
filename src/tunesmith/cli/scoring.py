"""``tunesmith score`` (a reward model, stage rm) and ``tunesmith classify`` (a classifier, stage cls).

    tunesmith score RUN --prompt "..." --reply "..."     # the reward of one reply
    tunesmith score RUN --data pairs.json                 # per-row rewards, then pairwise accuracy and margin
    tunesmith classify RUN --text "..."                   # the predicted label
    tunesmith classify RUN --data rows.tsv                # per-row labels, then accuracy if the rows have labels

They are the generate of the stages whose output is a number or a label. The summary of a file is
computed by the stage's own validation code (the same as ``tunesmith eval --model RUN --data FILE``).
"""

from __future__ import annotations

import argparse
import json

from tunesmith.cli.common import at_least, device
from tunesmith.core.errors import TunesmithError


def register(commands) -> None:
    score = commands.add_parser("score", help="Score replies with a reward model (a stage rm result).")
    add_common(score)
    score.add_argument("--data", help="Preference pairs (prompt/chosen/rejected, as rm trains on) or conversations "
                       "ending in the assistant reply to score.")
    score.add_argument("--prompt", help="The user message (with --reply).")
    score.add_argument("--reply", help="The assistant reply to score (with --prompt).")
    score.add_argument("--system", help="System message (with --prompt).")
    score.set_defaults(handler=cmd_score)
    classify = commands.add_parser("classify", help="Label texts with a classifier (a stage cls result).")
    add_common(classify)
    classify.add_argument("--data", help="Rows with the text field of training (and, for accuracy, the label field).")
    classify.add_argument("--text", help="One text to label.")
    classify.set_defaults(handler=cmd_classify)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="The run folder (or its adapter/ or model/ folder).")
    parser.add_argument("--max-length", type=at_least(8), help="Longest token sequence (default: the run's).")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default="cpu", type=device, help="cpu, cuda, cuda:1, ...")


def stage_of(run: str, wanted: str, command: str):
    """The run's stage, refusing a run of another stage in one sentence."""
    from tunesmith.evaluation.stage_metrics import judged_stage
    from tunesmith.inference.results import locate_result

    location = locate_result(run)
    if location is None:
        raise TunesmithError(f"{run} is not a folder; give the run folder of a stage {wanted} result")
    judged = judged_stage(location)
    kind = judged.kind if judged is not None else (location.manifest or {}).get("stage", "unknown")
    if kind != wanted:
        other = {"rm": "tunesmith score", "cls": "tunesmith classify"}.get(kind, "tunesmith generate")
        raise TunesmithError(f"{run} was trained with stage {kind}, not {wanted}: tunesmith {command} needs a stage "
                             f"{wanted} result; use {other} for it")
    return location, judged


def summary(args: argparse.Namespace, judged, model, tokenizer) -> dict:
    """The stage's validation metrics of the file (what ``tunesmith eval --data`` prints)."""
    from tunesmith.evaluation.stage_metrics import held_out_task
    from tunesmith.evaluation.suite import run_task

    result = run_task(model, tokenizer, held_out_task(judged, args.data, "data", args.batch_size, args.max_length))
    return {"count": result["count"], **result["metrics"]}


def cmd_score(args: argparse.Namespace) -> int:
    from tunesmith.data.formats import preference_parts
    from tunesmith.data.preference import judged_conversation
    from tunesmith.data.readers import read_records
    from tunesmith.stages.rm import load_reward_model, score_conversations

    if bool(args.data) == bool(args.prompt or args.reply) or (args.prompt is None) != (args.reply is None):
        raise TunesmithError("tunesmith score needs --data FILE, or --prompt and --reply together")
    location, judged = stage_of(args.run, "rm", "score")
    model, tokenizer = load_reward_model(location.folder, args.device, args.dtype)
    max_length = args.max_length or judged.max_length
    if args.prompt is not None:
        turns = ([{"role": "system", "content": args.system}] if args.system else [])
        turns += [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": args.reply}]
        print(json.dumps({"reward": score_conversations(model, tokenizer, [turns], max_length)[0]}))
        return 0
    records = list(read_records(args.data))
    if records and {"chosen", "rejected"} <= set(records[0].fields):
        rows = []
        for record in records:
            prompt, chosen, rejected = preference_parts(record)
            good, bad = score_conversations(model, tokenizer, [prompt + [{"role": "assistant", "content": chosen}],
                                                               prompt + [{"role": "assistant", "content": rejected}]],
                                            max_length)
            rows.append({"row": record.where, "chosen": good, "rejected": bad})
        print(json.dumps({"data": args.data, "rows": rows, "metrics": summary(args, judged, model, tokenizer)},
                         indent=2))
        return 0
    rows = []
    for record in records:
        turns = [dict(turn) for turn in judged_conversation(record, "preference pairs (prompt, chosen, rejected) or "
                                                             "conversations ending in the reply to score")]
        rows.append({"row": record.where, "reward": score_conversations(model, tokenizer, [turns], max_length)[0]})
    print(json.dumps({"data": args.data, "rows": rows}, indent=2))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from tunesmith.data.classification import label_text
    from tunesmith.data.readers import read_records
    from tunesmith.stages.cls import classify, load_classifier

    if bool(args.data) == bool(args.text):
        raise TunesmithError("tunesmith classify needs --data FILE or --text TEXT (one of them)")
    location, judged = stage_of(args.run, "cls", "classify")
    model, tokenizer, labels = load_classifier(location.folder, args.device, args.dtype)
    max_length = args.max_length or judged.max_length
    if args.text is not None:
        print(json.dumps({"label": classify(model, tokenizer, [args.text], labels, max_length)[0]}))
        return 0
    config = judged.config
    records = list(read_records(args.data, config.text_field))
    rows = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        texts = [text_of(record, config.text_field) for record in chunk]
        predicted = classify(model, tokenizer, texts, labels, max_length)
        rows += [{"row": record.where, "label": label} for record, label in zip(chunk, predicted)]
    document = {"data": args.data, "rows": rows}
    if records and config.label_field in records[0].fields:
        for row, record in zip(rows, records):
            row["expected"] = label_text(record, config.label_field)
        document["metrics"] = summary(args, judged, model, tokenizer)
    print(json.dumps(document, indent=2))
    return 0


def text_of(record, field: str) -> str:
    value = record.fields.get(field)
    if not isinstance(value, str):
        raise TunesmithError(f"{record.where}: missing text field '{field}' (the run's stage.text_field); fields "
                             f"present: {', '.join(record.fields) or 'none'}")
    return value
