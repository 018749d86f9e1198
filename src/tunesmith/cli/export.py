"""``tunesmith export RUN --format hf|peft|gguf [--quantize f16|q8_0|q4_0] [--ollama] --out DIR``."""

from __future__ import annotations

import argparse

from tunesmith.cli.common import device, status
from tunesmith.core.errors import TunesmithError


def register(commands) -> None:
    export = commands.add_parser("export", help="Write a trained result as a model folder, a peft adapter or a GGUF "
                                                "file, checked by reloading it.")
    export.add_argument("result", nargs="?", help="A run folder, its adapter/ or model/ folder, or a model folder.")
    export.add_argument("--adapter", help="The result folder (the older spelling of RESULT).")
    export.add_argument("--out", required=True, help="Folder to write (must not exist or be empty).")
    export.add_argument("--format", choices=["hf", "peft", "gguf"],
                        help="hf: merged model folder; peft: the adapter as plain peft loads it; gguf: a GGUF file "
                             "for llama.cpp and Ollama (default: hf).")
    export.add_argument("--quantize", choices=["f16", "q8_0", "q4_0"], help="GGUF weight type (default f16).")
    export.add_argument("--ollama", action="store_true", help="With --format gguf: also write an Ollama Modelfile.")
    export.add_argument("--merge", action="store_true", help="Fold the adapter into the base weights (= --format hf).")
    export.add_argument("--model", help="Base model (default: the one the run trained).")
    export.add_argument("--device", default="cpu", type=device, help="cpu, cuda, cuda:1, ...")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunesmith.training.run_folder import writing_into

    if (args.result is None) == (args.adapter is None):
        raise TunesmithError("give the result to export once: as RESULT or as --adapter DIR")
    with writing_into(Path(args.out)):  # --out inside a run folder: not while another process writes that run
        report = _export(args)
    print(report.describe())
    return 0


def _export(args: argparse.Namespace):
    from tunesmith.export import export, export_result

    status(f"exporting {args.result or args.adapter} to {args.out}, then checking the export by reloading it ...")
    if args.format is None and args.quantize is None and not args.ollama:
        report = export_result(args.result or args.adapter, args.out, args.merge or args.result is not None,
                               args.model, args.device)
    else:
        if args.merge and args.format not in (None, "hf"):
            raise TunesmithError(f"--merge means --format hf; drop it for --format {args.format}")
        fmt = args.format or ("gguf" if args.quantize or args.ollama else "hf")
        report = export(args.result or args.adapter, args.out, fmt, args.quantize, args.ollama, args.model,
                        args.device)
    return report
