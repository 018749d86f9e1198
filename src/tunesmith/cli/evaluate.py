"""``tunesmith eval``: loss and perplexity of a model on a data file."""

from __future__ import annotations

import argparse
import json

from tunesmith.cli.common import add_model_arguments, load_model_from_args


def register(commands) -> None:
    evaluate = commands.add_parser("eval", help="Loss and perplexity of a model on a data file.")
    add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help="Data file (any supported format).")
    evaluate.add_argument("--format", default="auto")
    evaluate.add_argument("--max-length", type=int, default=1024)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.config import DataSection
    from tunesmith.data.dataset import encode_all, load_examples
    from tunesmith.evaluation import evaluate_loss
    from tunesmith.runtime import Runtime, pick_device

    model, tokenizer = load_model_from_args(args)
    section = DataSection(train=(args.data,), format=args.format, max_length=args.max_length)
    examples, _ = load_examples(args.data, args.format)
    encoded, stats = encode_all(examples, tokenizer, section, "evaluation")
    runtime = Runtime(device=pick_device(args.device.split(":")[0]))
    metrics = evaluate_loss(model, encoded, args.batch_size, tokenizer.pad_token_id, runtime)
    print(json.dumps({"data": args.data, "examples": len(encoded), **metrics}, indent=2))
    return 0
