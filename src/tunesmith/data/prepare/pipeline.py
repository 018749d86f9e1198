"""``data.prepare`` inside ``train``: clean and de-duplicate the training files into a cached,
manifested data set.

The manifest records the source files and their hashes, the steps and their settings, the
tokenizer, the template and the format version; its key (a hash of all of that) names the cache
folder, so any change to an input or a step prepares afresh instead of trusting a stale cache.
The counts of what each step did are recorded too, and are the same whenever the key is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tunesmith.config.prepare import PrepareSection
from tunesmith.core.files import file_sha256, write_text_atomic
from tunesmith.core.runtime import cache_dir
from tunesmith.data.formats import FormatOptions
from tunesmith.data.prepare.clean import Cleaner, CleanReport
from tunesmith.data.prepare.dedup import Deduplicator, DedupReport, deduplicate
from tunesmith.data.prepare.records import AtomicJsonlWriter, BadRecords, RecordText, stream_records

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What names a tokenizer in a manifest: where it came from and its vocabulary size."""
    if tokenizer is None:
        return {}
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer)}


def manifest_inputs(train: tuple[str, ...], prepare: PrepareSection, data_format: str, text_field: str,
                    tokenizer=None, template: Optional[str] = None) -> dict[str, Any]:
    """Everything the prepared data depends on; its hash is the cache key."""
    against = prepare.dedup.against if prepare.dedup else ()
    return {
        "format_version": FORMAT_VERSION,
        "sources": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in train],
        "evaluation_files": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in against],
        "steps": prepare.model_dump(mode="json", exclude={"cache_dir"}),
        "data_format": data_format,
        "text_field": text_field,
        "tokenizer": tokenizer_identity(tokenizer),
        "template": template,
    }


def manifest_key(inputs: dict[str, Any]) -> str:
    """The hash naming a prepared data set."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class PreparedFiles:
    """The prepared training files, their manifest, and whether a cached copy was reused."""

    files: tuple[str, ...]
    manifest: dict[str, Any]
    folder: Path
    reused: bool


def prepare_training_files(train: tuple[str, ...], prepare: PrepareSection, cache_root: Path, *,
                           data_format: str = "auto", options: FormatOptions = FormatOptions(),
                           tokenizer=None, template: Optional[str] = None) -> PreparedFiles:
    """Clean and de-duplicate ``train`` (one shared de-duplication across files) into the cache.

    Args:
        train: The training files.
        prepare: The steps.
        cache_root: Folder holding prepared data sets, one sub-folder per manifest key.
        data_format: Record layout, or ``auto``.
        options: Format options (text field).
        tokenizer: Tokenizer for token length bounds; recorded in the manifest.
        template: Chat template name; recorded in the manifest.

    Returns:
        The prepared files (one per source, same order) and the manifest.

    Raises:
        TunesmithError: On a malformed record under ``on_error: fail``.
    """
    inputs = manifest_inputs(train, prepare, data_format, options.text_field, tokenizer, template)
    key = manifest_key(inputs)
    folder = Path(cache_root) / key
    names = tuple(f"{index}-{Path(p).name.split('.')[0]}.jsonl" for index, p in enumerate(train))
    folder.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(folder) + ".lock"):  # processes of one distributed run prepare it once
        return _prepared_or_reused(train, prepare, folder, names, key, inputs, data_format, options, tokenizer)


def _prepared_or_reused(train, prepare, folder: Path, names, key: str, inputs, data_format, options, tokenizer) -> PreparedFiles:
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file() and all((folder / name).is_file() for name in names):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            logger.info("reusing prepared data %s", folder)
            return PreparedFiles(tuple(str(folder / n) for n in names), manifest, folder, True)
    counts = _run_steps(train, prepare, folder, names, data_format, options, tokenizer)
    manifest = {"key": key, **inputs, "counts": counts}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
    return PreparedFiles(tuple(str(folder / n) for n in names), manifest, folder, False)


def _run_steps(train, prepare: PrepareSection, folder: Path, names, data_format, options, tokenizer) -> dict[str, Any]:
    record_text = RecordText(data_format, options)
    count_tokens = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) if tokenizer else None
    cleaner = Cleaner(prepare.clean, count_tokens, record_text) if prepare.clean else None
    deduplicator = Deduplicator(prepare.dedup, record_text) if prepare.dedup else None
    bad = BadRecords(prepare.on_error)
    clean_report, dedup_report = CleanReport(bad=bad), DedupReport(bad=bad)
    if deduplicator and prepare.dedup.against:
        dedup_report.evaluation_rows = deduplicator.load_evaluation(prepare.dedup.against, bad)
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in zip(train, names):
        record_text.data_format = data_format  # each file may have its own layout
        records = stream_records(source, bad, options.text_field)
        if cleaner:
            records = cleaner.run(records, clean_report)
        if deduplicator:
            records = deduplicate(records, deduplicator, dedup_report)
        with AtomicJsonlWriter(folder / name, force=True, inputs=(source,), own_folder=True) as writer:
            for record in records:
                writer.write(record.fields)
    counts: dict[str, Any] = {"skipped_bad": bad.count}
    if cleaner:
        counts["clean"] = {k: v for k, v in clean_report.as_dict().items() if k not in ("skipped_bad", "bad_examples")}
    if deduplicator:
        counts["dedup"] = {k: v for k, v in dedup_report.as_dict().items()
                           if k not in ("skipped_bad", "bad_examples", "clusters")}
    return counts


def prepare_for_training(section, tokenizer, template: str, cache: Optional[Path] = None) -> tuple[str, ...]:
    """The training files ``train`` reads: the recipe's own, or their prepared copies when
    ``data.prepare`` is given (the small hook called by :func:`tunesmith.data.dataset.encode_data`).

    Prepared copies go to ``data.prepare.cache_dir``, else ``cache/prepared`` (``cache`` defaults to
    tunesmith's cache folder)."""
    if section.prepare is None:
        return section.train
    if section.prepare.cache_dir:
        root = Path(section.prepare.cache_dir)
    else:

        root = (cache or cache_dir()) / "prepared"
    options = FormatOptions(text_field=section.text_field, system_prompt=section.system_prompt)
    prepared = prepare_training_files(section.train, section.prepare, root, data_format=section.format,
                                      options=options, tokenizer=tokenizer, template=template)
    verb = "reused" if prepared.reused else "prepared"
    print(f"data.prepare: {verb} {prepared.folder} ({json.dumps(prepared.manifest['counts'])})")
    return prepared.files
