"""Recipe sections of data preparation (``data.prepare``): cleaning and de-duplication before training.

The same sections drive ``tunesmith data clean`` and ``tunesmith data dedup``, so a step tried on the
command line is written into a recipe unchanged.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tunesmith.config.base import Section

PiiKind = Literal["email", "phone", "card"]


class CleanSection(Section):
    """Cleaning of every text field of a record; each step is optional and counted."""

    unicode: bool = Field(True, description="Unicode NFKC normalisation (full-width letters, ligatures).")
    html: bool = Field(
        False, description="Strip HTML tags and decode entities where a text holds tags (off: it also strips code that shows HTML)."
    )
    control: bool = Field(True, description="Remove control and zero-width characters (keeps newline and tab).")
    whitespace: bool = Field(True, description="Collapse runs of spaces, trim lines, at most one blank line.")
    pii: tuple[PiiKind, ...] = Field(
        ("email", "phone", "card"),
        description="Personal data masked as [EMAIL], [PHONE], [CARD_NUMBER] (cards only when the Luhn check passes).",
    )
    required: tuple[str, ...] = Field((), description="Fields a record must have, non-empty, or it is dropped.")
    min_length: Optional[int] = Field(None, ge=0, description="Drop records whose text is shorter than this.")
    max_length: Optional[int] = Field(None, ge=1, description="Drop records whose text is longer than this.")
    length_unit: Literal["chars", "tokens"] = Field(
        "chars", description="Unit of min_length/max_length: characters, or tokens of the model's tokenizer."
    )


class DedupSection(Section):
    """Exact and near-duplicate removal (keeping the first of each cluster), and decontamination."""

    exact: bool = Field(True, description="Drop records whose normalised text (case, width, spacing) repeats.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash/LSH.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity at which two records are near-duplicates.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: more accurate, slower).")
    shingle_size: int = Field(5, ge=1, description="Characters per shingle of the normalised text.")
    against: tuple[str, ...] = Field(
        (), description="Evaluation files: training records that duplicate or near-duplicate one of theirs are dropped."
    )


class PrepareSection(Section):
    """Preparation run by ``train`` before tokenising; the result is cached with a manifest."""

    clean: Optional[CleanSection] = Field(None, description="Cleaning steps (off unless given).")
    dedup: Optional[DedupSection] = Field(None, description="De-duplication and decontamination (off unless given).")
    on_error: Literal["skip", "fail"] = Field(
        "fail", description="A malformed record stops the run (fail) or is skipped and counted (skip)."
    )
    cache_dir: Optional[str] = Field(
        None, description="Folder of prepared data sets (default: the tunesmith cache's 'prepared' folder)."
    )
