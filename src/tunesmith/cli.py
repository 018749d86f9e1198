"""The ``tunesmith`` command line: train, generate, chat, eval, config, models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from tunesmith.errors import TunesmithError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one sentence and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        return args.handler(args) or 0
    except TunesmithError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Hide the libraries' own loading bars and deprecation chatter; our progress bar is enough."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a language model from one recipe file.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log what each step does.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Fine-tune as a recipe says.")
    train.add_argument("recipe", help="YAML recipe file.")
    train.add_argument("overrides", nargs="*", help="Dotted overrides such as train.lr=1e-4.")
    train.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint.")
    train.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    train.add_argument("--no-progress", action="store_true", help="No progress bar.")
    train.set_defaults(handler=cmd_train)

    for name, help_text in (("generate", "Answer one prompt."), ("chat", "Chat interactively, streaming tokens.")):
        sub = commands.add_parser(name, help=help_text)
        add_model_arguments(sub)
        sub.add_argument("--system", help="System message.")
        sub.add_argument("--max-new-tokens", type=int, default=256)
        sub.add_argument("--temperature", type=float, default=0.0, help="0 means greedy.")
        if name == "generate":
            sub.add_argument("--prompt", required=True, help="The user message.")
        sub.set_defaults(handler=cmd_generate if name == "generate" else cmd_chat)

    evaluate = commands.add_parser("eval", help="Loss and perplexity of a model on a data file.")
    add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help="Data file (any supported format).")
    evaluate.add_argument("--format", default="auto")
    evaluate.add_argument("--max-length", type=int, default=1024)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.set_defaults(handler=cmd_eval)

    config = commands.add_parser("config", help="Print the recipe schema; 'config check RECIPE' validates.")
    config.add_argument("action", nargs="?", choices=["check"])
    config.add_argument("recipe", nargs="?")
    config.add_argument("overrides", nargs="*")
    config.set_defaults(handler=cmd_config)

    models = commands.add_parser("models", help="List the built-in model aliases.")
    models.set_defaults(handler=cmd_models)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Alias, hub id or folder.")
    parser.add_argument("--adapter", help="A trained adapter folder (a run's adapter/).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true")


def cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.config import load_recipe
    from tunesmith.finetune import finetune

    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    recipe = load_recipe(args.recipe, overrides)
    finetune(recipe, resume=args.resume, recipe_path=args.recipe, progress=not args.no_progress)
    return 0


def _load(args: argparse.Namespace):
    from tunesmith.inference import load_for_inference

    return load_for_inference(args.model, args.adapter, args.dtype, args.device, args.trust_remote_code)


def _conversation(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def cmd_generate(args: argparse.Namespace) -> int:
    from tunesmith.inference import generate

    model, tokenizer = _load(args)
    conversation = _conversation(args.system) + [{"role": "user", "content": args.prompt}]
    print(generate(model, tokenizer, [conversation], args.max_new_tokens, args.temperature)[0])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith.inference import stream_reply

    model, tokenizer = _load(args)
    conversation = _conversation(args.system)
    print("Chat with the model. /reset starts over, /exit (or Ctrl-D) quits.")
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            conversation = _conversation(args.system)
            continue
        if not user:
            continue
        conversation.append({"role": "user", "content": user})
        print("model> ", end="", flush=True)
        reply = ""
        for piece in stream_reply(model, tokenizer, conversation, args.max_new_tokens, args.temperature):
            reply += piece
            print(piece, end="", flush=True)
        print()
        conversation.append({"role": "assistant", "content": reply.strip()})


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.config import DataSection
    from tunesmith.data.dataset import encode_all, load_examples
    from tunesmith.evaluation import evaluate_loss
    from tunesmith.runtime import Runtime, pick_device

    model, tokenizer = _load(args)
    section = DataSection(train=(args.data,), format=args.format, max_length=args.max_length)
    examples, _ = load_examples(args.data, args.format)
    encoded, stats = encode_all(examples, tokenizer, section, "evaluation")
    runtime = Runtime(device=pick_device(args.device.split(":")[0]))
    metrics = evaluate_loss(model, encoded, args.batch_size, tokenizer.pad_token_id, runtime)
    print(json.dumps({"data": args.data, "examples": len(encoded), **metrics}, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from tunesmith.config import load_recipe, recipe_to_yaml, schema_text

    if args.action != "check":
        print(schema_text())
        return 0
    if not args.recipe:
        raise TunesmithError("usage: tunesmith config check RECIPE [overrides]")
    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_yaml(recipe), end="")
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tunesmith.models import ALIASES

    for name in ALIASES:
        alias = ALIASES.get(name)
        print(f"{name}\n    {alias.description}\n    from: {alias.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
