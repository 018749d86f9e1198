"""``tunesmith export``: a trained result as a plain Hugging Face model folder."""

from __future__ import annotations

import argparse

from tunesmith.cli.common import device


def register(commands) -> None:
    export = commands.add_parser("export", help="Write a trained result as a plain model folder (merging adapters).")
    export.add_argument("--adapter", required=True, help="A run's adapter/ (or model/) folder.")
    export.add_argument("--out", required=True, help="Folder to write (must not exist or be empty).")
    export.add_argument("--merge", action="store_true", help="Fold the adapter into the base weights.")
    export.add_argument("--model", help="Base model (default: the one the run trained).")
    export.add_argument("--device", default="cpu", type=device, help="cpu, cuda, cuda:1, ...")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tunesmith.export import export_result

    report = export_result(args.adapter, args.out, args.merge, args.model, args.device)
    print(f"exported {report.method} result to {report.out}; reloaded with transformers, "
          f"max |logit difference| {report.max_logit_difference:.2e}")
    return 0
