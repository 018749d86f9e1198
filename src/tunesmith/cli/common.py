"""Arguments shared by the commands that load a model."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Alias, hub id or folder.")
    parser.add_argument("--adapter", help="A trained adapter folder (a run's adapter/).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_model_from_args(args: argparse.Namespace):
    """(model, tokenizer) named by --model/--adapter/--dtype/--device."""
    from tunesmith.inference import load_for_inference

    return load_for_inference(args.model, args.adapter, args.dtype, args.device, args.trust_remote_code)
