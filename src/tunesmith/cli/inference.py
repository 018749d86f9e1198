"""``tunesmith generate`` and ``tunesmith chat``."""

from __future__ import annotations

import argparse

from tunesmith.cli.common import add_model_arguments, at_least, check_generation_length, load_model_from_args


def register(commands) -> None:
    for name, help_text in (("generate", "Answer one prompt."), ("chat", "Chat interactively, streaming tokens.")):
        sub = commands.add_parser(name, help=help_text)
        add_model_arguments(sub)
        sub.add_argument("--system", help="System message.")
        sub.add_argument("--max-new-tokens", type=at_least(1), default=256)
        sub.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 means greedy.")
        sub.add_argument("--compile", action="store_true",
                         help="torch.compile the decode step: faster per token, but minutes to compile first "
                              "(worth it for long or many replies; docs/speed.md).")
        sub.add_argument("--quantize", metavar="int8|int4",
                         help="Decode with int8 (per-channel scales) or int4 (groups of 32) copies of the linear "
                              "layers' weights: faster on a CPU, at a measured cost in quality (docs/speed.md).")
        if name == "generate":
            sub.add_argument("--prompt", required=True, help="The user message.")
        sub.set_defaults(handler=cmd_generate if name == "generate" else cmd_chat)


def _conversation(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def refuse_scorers(args: argparse.Namespace) -> None:
    """A reward model or a classifier gives numbers or labels, not text: say which command it needs."""
    from tunesmith.core.errors import TunesmithError
    from tunesmith.inference.results import locate_result

    source = args.adapter or args.model
    location = locate_result(source)
    stage = ((location.manifest or {}).get("stage") if location is not None else None)
    command = {"rm": "tunesmith score", "cls": "tunesmith classify"}.get(stage)
    if command is not None:
        raise TunesmithError(f"{source} was trained with stage {stage}: it scores rather than writes text; use "
                             f"{command} {source}")


def cmd_generate(args: argparse.Namespace) -> int:
    from tunesmith.inference.generate import generate
    from tunesmith.inference.quantized import check_quantize

    refuse_scorers(args)
    check_quantize(None, args.quantize)
    model, tokenizer = load_model_from_args(args, only_model=True)
    check_generation_length(model, tokenizer, args.max_new_tokens)
    conversation = _conversation(args.system) + [{"role": "user", "content": args.prompt}]
    print(generate(model, tokenizer, [conversation], args.max_new_tokens, args.temperature,
                   compile=args.compile, quantize=args.quantize)[0])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith.inference.generate import stream_reply
    from tunesmith.inference.quantized import check_quantize

    refuse_scorers(args)
    check_quantize(None, args.quantize)
    model, tokenizer = load_model_from_args(args, only_model=True)
    check_generation_length(model, tokenizer, args.max_new_tokens)
    check_quantize(model, args.quantize)
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
        for piece in stream_reply(model, tokenizer, conversation, args.max_new_tokens, args.temperature,
                                  compile=args.compile, quantize=args.quantize):
            reply += piece
            print(piece, end="", flush=True)
        print()
        conversation.append({"role": "assistant", "content": reply.strip()})
