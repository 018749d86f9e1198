"""``tunesmith data inspect|clean|dedup|augment|split|convert``: preparing a data set, one step each.

Every step streams its input, writes a new JSON Lines file atomically (refusing to replace an
existing one without ``--force``, and with it any file tunesmith did not write), never touches the input, and with ``--on-error skip`` skips
and counts malformed records instead of stopping at the first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tunesmith.cli import quiet_libraries
from tunesmith.cli.common import at_least, between, counting, device, status


def register(commands) -> None:
    data = commands.add_parser("data", help="Inspect, clean, de-duplicate, augment, split or convert a data set.")
    steps = data.add_subparsers(dest="data_command", required=True, metavar="STEP")
    _register_inspect(steps)
    _register_clean(steps)
    _register_dedup(steps)
    _register_augment(steps)
    _register_split(steps)
    _register_convert(steps)


def _common(parser: argparse.ArgumentParser, output: bool = True, on_error_help: str = "") -> None:
    parser.add_argument("file", help="Data file (.json, .jsonl, .csv, .tsv, .parquet, .txt, optionally .gz).")
    if output:
        parser.add_argument("-o", "--output", required=True, help="New .jsonl file to write.")
        parser.add_argument("--force", action="store_true", help="Replace the output if it exists and tunesmith wrote it (never a file of yours).")
    parser.add_argument("--format", default="auto", help="Record layout: alpaca, sharegpt, messages, preference, text, auto.")
    parser.add_argument("--text-field", default="text", help="Field of the 'text' layout.")
    parser.add_argument("--columns", type=columns_flag, default=None, metavar="ROLE=COLUMN,...",
                        help="Which column holds what, as data.columns: e.g. prompt=headline,label=topic "
                             "(roles: prompt, answer, label, system).")
    parser.add_argument("--on-error", choices=["skip", "fail"], default="fail",
                        help=on_error_help or "Skip and count malformed records, or stop at the first (default).")
    parser.add_argument("--report", help="Also write the report as JSON to this file.")


def columns_flag(text: str):
    """``prompt=headline,label=topic`` -> the recipe's data.columns section (argparse type of --columns)."""
    from pydantic import ValidationError

    from tunesmith.config import ColumnsSection

    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: give ROLE=COLUMN pairs separated by commas, e.g. prompt=headline,label=topic")
    try:
        return ColumnsSection.model_validate({role.strip(): column.strip() for role, column in pairs})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise argparse.ArgumentTypeError(f"{text!r}: {where + ': ' if where else ''}{first['msg']} "
                                         "(roles: prompt, answer, label, system)") from None


def _options(args: argparse.Namespace):
    from tunesmith.data.formats import FormatOptions

    return FormatOptions(text_field=args.text_field, columns=args.columns)


def _record_text(args: argparse.Namespace):
    from tunesmith.data.prepare.records import RecordText

    return RecordText(args.format, _options(args))


def _finish(args: argparse.Namespace, report: Any) -> int:
    print(report.describe())
    if args.report:
        Path(args.report).write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    return 0


def _load_tokenizer(name: str):
    from tunesmith.config import ModelSection
    from tunesmith.core.runtime import cache_dir
    from tunesmith.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(name, cache_dir())
    return path, load_tokenizer(path, ModelSection(name=name))


# --- inspect ----------------------------------------------------------------------------------


def _register_inspect(steps) -> None:
    inspect = steps.add_parser("inspect", help="Counts, lengths, duplicates, language and a sufficiency verdict.")
    _common(inspect, output=False, on_error_help="skip (default): report malformed and empty records and exit 0; "
            "fail: report them, then exit with status 2 if any record is malformed or none is usable.")
    inspect.add_argument("--model", help="Measure lengths in this model's tokens (alias, hub id or folder); else words.")
    inspect.add_argument("--template", default="auto", help="Chat template used for token lengths (as data.template).")
    inspect.add_argument("--max-length", type=at_least(1), default=1024, help="Training max_length, for the truncated share (lengths are measured up to 64 times it).")
    inspect.add_argument("--plot", help="Write the length histogram as a PNG here.")
    inspect.add_argument("--near-sample", type=at_least(0), default=20000, help="Records checked for near duplicates.")
    inspect.set_defaults(handler=cmd_inspect, on_error="skip")


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunesmith.data.prepare.inspect import (
        MEASURED_LENGTH_FACTOR,
        histogram_text,
        inspect_file,
        model_parameters,
        save_histogram_png,
        token_measure,
    )
    from tunesmith.data.templates import resolve_template

    measure, unit, parameters = None, "words", None
    if args.model:
        quiet_libraries()
        path, tokenizer = _load_tokenizer(args.model)
        resolve_template(tokenizer, args.template)
        measure, unit, parameters = token_measure(tokenizer, longest=MEASURED_LENGTH_FACTOR * args.max_length), "tokens", model_parameters(path)
    report = inspect_file(args.file, data_format=args.format, options=_options(args),
                          measure=measure, unit=unit, max_length=args.max_length, parameters=parameters,
                          near_sample=args.near_sample)
    summary = report.as_dict()
    print(f"{report.file}: {report.records} records ({report.data_format}); fields: "
          + ", ".join(f"{name} {count}" for name, count in report.fields.most_common()))
    print(f"empty {report.empty}, malformed {report.bad.count}"
          + "".join(f"\n  {message}" for message in report.bad.examples))
    print(histogram_text(report.lengths, unit=unit))
    if summary["length"]:
        share = report.truncated / max(1, len(report.lengths))
        print(f"length: {summary['length']}; {report.truncated} ({share:.1%}) longer than max_length {args.max_length}")
    print(f"exact duplicates {report.exact_duplicates}; near duplicates {report.near_duplicates} "
          f"(of the first {report.near_checked}); languages: "
          + ", ".join(f"{lang} {count}" for lang, count in report.languages.most_common(3)))
    print(report.verdict())
    if args.plot:
        save_histogram_png(report.lengths, args.plot, unit, args.max_length)
        print(f"histogram written to {args.plot}")
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    if args.on_error == "fail":
        _fail_on_bad(report)
    return 0


def _fail_on_bad(report) -> None:
    """Under ``--on-error fail``: a malformed record, or a file without one usable record, is an error."""
    from tunesmith.core.errors import TunesmithError

    if report.bad.count:
        raise TunesmithError(f"{report.file}: {report.bad.count} malformed record(s), the first: "
                             f"{report.bad.examples[0]}")
    if not report.lengths:
        found = f"{report.records} record(s), all empty" if report.records else "no records"
        raise TunesmithError(f"{report.file} holds {found}; nothing in it can be trained on")


# --- clean ------------------------------------------------------------------------------------


def _register_clean(steps) -> None:
    from tunesmith.config.prepare import CleanSection

    clean = steps.add_parser("clean", help="Normalise, strip, mask personal data, drop by length or missing fields.")
    _common(clean)
    for name, field in CleanSection.model_fields.items():
        if field.annotation is bool:
            clean.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=field.default,
                               help=field.description)
    clean.add_argument("--pii", default="email,phone,card", help="Kinds of personal data to mask ('' for none).")
    clean.add_argument("--require", default="", help="Comma-separated fields a record must have, non-empty.")
    clean.add_argument("--min-length", type=at_least(0))
    clean.add_argument("--max-length", type=at_least(1))
    clean.add_argument("--length-unit", choices=["chars", "tokens"], default="chars")
    clean.add_argument("--model", help="Tokenizer for --length-unit tokens.")
    clean.set_defaults(handler=cmd_clean)


def cmd_clean(args: argparse.Namespace) -> int:
    from tunesmith.config.prepare import CleanSection
    from tunesmith.data.prepare.clean import clean_file

    section = _section(CleanSection, unicode=args.unicode, html=args.html, control=args.control,
                       whitespace=args.whitespace, pii=_names(args.pii), required=_names(args.require),
                       min_length=args.min_length, max_length=args.max_length, length_unit=args.length_unit)
    count_tokens = None
    if args.model:
        _, tokenizer = _load_tokenizer(args.model)
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    report = clean_file(args.file, args.output, section, on_error=args.on_error, force=args.force,
                        count_tokens=count_tokens, record_text=_record_text(args))
    return _finish(args, report)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _section(cls, **values):
    """Build a recipe section from options; invalid values become one-sentence errors."""
    from pydantic import ValidationError

    from tunesmith.core.errors import TunesmithError

    try:
        return cls(**values)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "an option"
        raise TunesmithError(f"{option}: {first['msg']}") from None


# --- dedup ------------------------------------------------------------------------------------


def _register_dedup(steps) -> None:
    dedup = steps.add_parser("dedup", help="Drop exact and near duplicates (and rows of evaluation files).")
    _common(dedup)
    dedup.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True, help="Exact duplicates.")
    dedup.add_argument("--near", action=argparse.BooleanOptionalAction, default=True, help="Near duplicates (MinHash/LSH).")
    dedup.add_argument("--threshold", type=between(0.0, 1.0), default=0.8, help="Jaccard similarity of near duplicates.")
    dedup.add_argument("--num-perm", type=at_least(1), default=128, help="MinHash permutations.")
    dedup.add_argument("--against", action="append", default=[], help="Evaluation file to decontaminate against (repeatable).")
    dedup.set_defaults(handler=cmd_dedup)


def cmd_dedup(args: argparse.Namespace) -> int:
    from tunesmith.config.prepare import DedupSection
    from tunesmith.data.prepare.dedup import dedup_file

    section = _section(DedupSection, exact=args.exact, near=args.near, threshold=args.threshold,
                       num_perm=args.num_perm, against=tuple(args.against))
    report = dedup_file(args.file, args.output, section, on_error=args.on_error, force=args.force,
                        record_text=_record_text(args))
    return _finish(args, report)


# --- augment ----------------------------------------------------------------------------------


def _register_augment(steps) -> None:
    augment = steps.add_parser("augment", help="Back-translate or paraphrase records with a model you name.")
    _common(augment)
    augment.add_argument("--method", choices=["back-translation", "paraphrase"], default="back-translation")
    augment.add_argument("--model", required=True,
                         help="Seq2seq translation/paraphrase model or instruction causal LM (alias, hub id or folder).")
    augment.add_argument("--back-model", help="Model translating back from the pivot (one-direction seq2seq models).")
    augment.add_argument("--source-language", default="English")
    augment.add_argument("--pivot-language", default="German")
    augment.add_argument("--prefix", default="", help="Text put before each input of a seq2seq model.")
    augment.add_argument("--fields", default="", help="Top-level fields to rewrite (default: the prompt side).")
    augment.add_argument("--min-similarity", type=between(0.0, 1.0), default=0.3, help="Drop rewrites less similar than this.")
    augment.add_argument("--max-similarity", type=between(0.0, 1.0), default=0.95, help="Drop rewrites more similar than this.")
    augment.add_argument("--max-new-tokens", type=at_least(1), default=256)
    augment.add_argument("--batch-size", type=at_least(1), default=8)
    augment.add_argument("--limit", type=at_least(1), help="Rewrite only the first N records.")
    augment.add_argument("--only-new", action="store_true", help="Write only the new rows.")
    augment.add_argument("--device", default="cpu", type=device)
    augment.set_defaults(handler=cmd_augment)


def cmd_augment(args: argparse.Namespace) -> int:
    from tunesmith.data.prepare.augment import AugmentSettings, augment_file, back_translation

    status(f"augment: loading torch, transformers and {args.model} ...")
    quiet_libraries()
    rewrite_to = _model_rewriter(args, args.model, "to")
    if args.method == "paraphrase":
        rewrite = rewrite_to
        origin = {"method": "paraphrase", "model": args.model}
    else:
        rewrite_back = _model_rewriter(args, args.back_model, "back") if args.back_model else None
        rewrite = back_translation(rewrite_to, args.source_language, args.pivot_language, rewrite_back)
        origin = {"method": "back-translation", "model": args.model, "back_model": args.back_model or args.model,
                  "pivot": args.pivot_language}
    settings = AugmentSettings(origin=origin, min_similarity=args.min_similarity, max_similarity=args.max_similarity,
                               fields=_names(args.fields), batch_size=args.batch_size, only_new=args.only_new)
    rewrite = counting(rewrite, "augment: texts rewritten")  # called batch by batch: a line per batch
    report = augment_file(args.file, args.output, rewrite, settings, on_error=args.on_error, force=args.force,
                          record_text=_record_text(args), limit=args.limit)
    return _finish(args, report)


def _model_rewriter(args: argparse.Namespace, name: str, direction: str):
    """A translator (back-translation) or rewriter (paraphrase) around the named model."""
    from tunesmith.core.runtime import cache_dir
    from tunesmith.inference import rewriters as augment

    kind, model, tokenizer = augment.load_rewrite_model(name, cache_dir(), args.device)
    if kind == "seq2seq":
        rewrite = augment.seq2seq_rewriter(model, tokenizer, args.max_new_tokens, args.batch_size, args.prefix)
        return rewrite if args.method == "paraphrase" else (lambda texts, source, target: rewrite(texts))
    if args.method == "paraphrase":
        return augment.causal_lm_paraphraser(model, tokenizer, args.max_new_tokens, args.batch_size)
    return augment.causal_lm_translator(model, tokenizer, args.max_new_tokens, args.batch_size)


# --- split and convert ------------------------------------------------------------------------


def _register_split(steps) -> None:
    split = steps.add_parser("split", help="Train/validation/test files by fraction, seeded, optionally stratified.")
    _common(split, output=False)
    split.add_argument("--out-dir", required=True, help="Folder for <part>.jsonl files.")
    split.add_argument("--fractions", default="train=0.8,validation=0.1,test=0.1")
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--stratify", help="Field whose values keep their proportions in every part.")
    split.add_argument("--force", action="store_true", help="Replace existing part files that tunesmith wrote (never a file of yours).")
    split.set_defaults(handler=cmd_split)


def cmd_split(args: argparse.Namespace) -> int:
    from tunesmith.data.prepare.split import parse_fractions, split_file

    report = split_file(args.file, args.out_dir, parse_fractions(args.fractions), seed=args.seed,
                        stratify=args.stratify, on_error=args.on_error, force=args.force)
    return _finish(args, report)


def _register_convert(steps) -> None:
    convert = steps.add_parser("convert", help="Rewrite records in another layout.")
    _common(convert)
    convert.add_argument("--to", required=True, help="alpaca, sharegpt, messages, preference or text.")
    convert.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from tunesmith.data.prepare.convert import convert_file

    report = convert_file(args.file, args.output, args.to, source_format=args.format,
                          options=_options(args), on_error=args.on_error, force=args.force)
    return _finish(args, report)
