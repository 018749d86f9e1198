"""``tunesmith methods``: every fine-tuning method, and with --model what each trains on that model."""

from __future__ import annotations

import argparse
import copy

# Variants worth a row of their own: (kind, settings beside the defaults).
VARIANTS = (("lora", {"dora": True}), ("lora", {"rslora": True}), ("adapter", {"placement": "pfeiffer"}),
            ("ptuning", {"encoder": "lstm"}))


def register(commands) -> None:
    methods = commands.add_parser("methods", help="List the fine-tuning methods (with --model: trainable parameters).")
    methods.add_argument("--model", help="Alias, hub id or folder: count trainable parameters of each method's defaults.")
    methods.set_defaults(handler=cmd_methods)


def method_rows() -> list[tuple[str, dict]]:
    """(kind, settings) for every registered method's defaults, then the listed variants."""
    from tunesmith.methods import METHODS

    return [(kind, {}) for kind in METHODS.names()] + list(VARIANTS)


def label(kind: str, settings: dict) -> str:
    return kind + "".join(f" {key}={value}" for key, value in settings.items())


def cmd_methods(args: argparse.Namespace) -> int:
    from tunesmith.config.loader import validate_method
    from tunesmith.methods import METHODS, build_method, count_parameters

    base = load_base(args.model) if args.model else None
    for kind, settings in method_rows():
        text = f"{label(kind, settings):<28} {METHODS.get(kind).description}"
        if base is not None:
            method = build_method(validate_method({"kind": kind, **settings}))
            trainable, total = count_parameters(method.apply(copy.deepcopy(base)))
            text += f"\n{'':<28} {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%)"
        print(text)
    return 0


def load_base(name: str):
    from tunesmith.config import ModelSection
    from tunesmith.core.runtime import cache_dir
    from tunesmith.models import load_model
    from tunesmith.models.loading import resolve_model_path

    return load_model(resolve_model_path(name, cache_dir()), ModelSection(name=name))
