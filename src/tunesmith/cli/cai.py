"""``tunesmith cai --principles FILE --prompts FILE --out DIR``: Constitutional-AI data (docs/rl.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.cli.common import (
    add_model_arguments,
    at_least,
    check_generation_length,
    counting,
    load_model_from_args,
    refuse_foreign_replacement,
)


def register(commands) -> None:
    cai = commands.add_parser("cai", help="Draft, critique against principles and revise: SFT and preference data.")
    cai.add_argument("--principles", required=True, help="JSONL of {name, critique_request, revision_request}.")
    cai.add_argument("--prompts", required=True, help="Prompt file (prompt/instruction/question field, or .txt lines).")
    cai.add_argument("--out", required=True, help="New folder for sft.jsonl, preference.jsonl and summary.json.")
    add_model_arguments(cai)
    cai.add_argument("--endpoint", help="Use an OpenAI-compatible server on this machine instead, e.g. "
                     "http://127.0.0.1:8000/v1 (--model then names the served model).")
    cai.add_argument("--api-key", help="Bearer key of the endpoint.")
    cai.add_argument("--max-new-tokens", type=at_least(1), default=256)
    cai.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 means greedy.")
    cai.add_argument("--batch-size", type=at_least(1), default=8, help="Prompts generated together.")
    cai.add_argument("--limit", type=at_least(1), help="Use only the first N prompts.")
    cai.add_argument("--seed", type=int, default=0, help="Seed of the principle drawn for each prompt.")
    cai.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out folder.")
    cai.set_defaults(handler=cmd_cai)


CAI_OUTPUTS = frozenset({"sft.jsonl", "preference.jsonl", "summary.json"})


def cmd_cai(args: argparse.Namespace) -> int:
    from tunesmith.workflows.constitutional import endpoint_chat, local_chat, read_principles, read_prompts, run_cai

    if args.overwrite:  # --overwrite replaces what an earlier `tunesmith cai` wrote, nothing else
        refuse_foreign_replacement(Path(args.out), CAI_OUTPUTS, "--overwrite")
    read_principles(args.principles), read_prompts(args.prompts)  # bad input fails before a model loads
    if args.endpoint:
        chat = endpoint_chat(args.endpoint, args.model, args.max_new_tokens, args.temperature, args.api_key)
    else:
        model, tokenizer = load_model_from_args(args)
        check_generation_length(model, tokenizer, args.max_new_tokens)
        chat = local_chat(model, tokenizer, args.max_new_tokens, args.temperature, args.batch_size)
    chat = counting(chat, "cai: replies", chunk=args.batch_size)  # a line per batch: hours of generation are never silent
    run_cai(chat, args.principles, args.prompts, Path(args.out), args.seed, args.limit, args.overwrite)
    return 0
