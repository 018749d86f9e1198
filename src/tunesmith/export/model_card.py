"""Model cards: a ``README.md`` in the Hugging Face model-card format for every result folder and export.

The card is YAML front matter (base model, library, tags, data sets, metrics as ``model-index``) followed
by the recipe, the data, the evaluation before and after (with forgetting), the hardware, time and memory,
and for an export the checks it passed. ``huggingface_hub.ModelCard.load`` reads it; the metadata follows
https://huggingface.co/docs/hub/model-cards (``model-index`` as the Hub's evaluation-results widget reads it).

The card is written from what the run itself wrote (its resolved recipe and ``summary.json``), so a card
can be rebuilt for any finished run folder.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tunesmith.core.files import write_text_atomic
from tunesmith.core.run_files import RunLayout
from tunesmith.models.aliases import ALIASES
from tunesmith.training.trackers import flatten_config

CARD_FILE = "README.md"

# What the Hub calls each kind of result (``pipeline_tag``).
PIPELINE = {"cls": "text-classification", "rm": "text-classification"}


@dataclass(frozen=True)
class CardFacts:
    """What a card says, gathered from a run folder.

    Attributes:
        name: The result's name (the run folder's name).
        recipe: The resolved recipe as a plain mapping (``config.yaml``).
        summary: The run's ``summary.json``.
        base_model: The base model as the Hub names it (an alias resolved to its hub id), or a local name.
        checks: For an export: the loaders that reloaded it and their verdicts, by name.
        export_format: For an export: ``hf``, ``peft`` or ``gguf`` (with its quantisation).
    """

    name: str
    recipe: dict[str, Any]
    summary: dict[str, Any]
    base_model: str
    checks: dict[str, str] = field(default_factory=dict)
    export_format: Optional[str] = None


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter, then the sections in Markdown."""
    front = yaml.safe_dump(card_metadata(facts), sort_keys=False, allow_unicode=True)
    sections = [f"# {facts.name}\n", introduction(facts), recipe_section(facts), data_section(facts.summary),
                evaluation_section(facts.summary), cost_section(facts.summary), checks_section(facts)]
    return f"---\n{front}---\n\n" + "\n".join(section for section in sections if section)


def write_card(folder: Path, facts: CardFacts) -> Path:
    """Write the card into ``folder`` (atomically) and return its path."""
    path = Path(folder) / CARD_FILE
    write_text_atomic(path, render_card(facts))
    return path


def card_metadata(facts: CardFacts) -> dict[str, Any]:
    """The front matter: what the Hub indexes."""
    recipe, summary = facts.recipe, facts.summary
    stage = (recipe.get("stage") or {}).get("kind", "sft")
    method = (recipe.get("method") or {}).get("kind", summary.get("method", "full"))
    adapter = summary.get("artifact", "").rstrip("/").endswith("adapter") and facts.export_format not in ("hf", "gguf")
    metadata: dict[str, Any] = {
        "base_model": facts.base_model,
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": PIPELINE.get(stage, "text-generation"),
        "tags": ["tunesmith", stage, method] + ([facts.export_format.split()[0]] if facts.export_format else []),
        "datasets": [Path(name).name for name in data_files(recipe)],
    }
    results = model_index_results(facts)
    if results:
        metadata["model-index"] = [{"name": facts.name, "results": results}]
    return metadata


def data_files(recipe: dict[str, Any]) -> list[str]:
    """The training data files a recipe names (one file, or the files of its sources)."""
    data = recipe.get("data") or {}
    files = list(as_list(data.get("train")))
    for source in data.get("sources") or ():
        files += as_list(source.get("train"))
    return files


def as_list(value: Any) -> list[str]:
    """A recipe's file field (one name or several) as a list."""
    return [] if not value else [value] if isinstance(value, str) else list(value)


def model_index_results(facts: CardFacts) -> list[dict[str, Any]]:
    """The task metric after training (and the final validation loss) as ``model-index`` results."""
    summary, results = facts.summary, []
    task = summary.get("task")
    if task:
        task_file = ((facts.recipe.get("eval") or {}).get("task") or {}).get("file", "held-out task")
        results.append({
            "task": {"type": PIPELINE.get((facts.recipe.get("stage") or {}).get("kind", "sft"), "text-generation")},
            "dataset": {"name": Path(task_file).name, "type": Path(task_file).stem},
            "metrics": [{"type": task["metric"], "value": round(float(task["after"]), 4),
                         "name": f"{task['metric']} (before tuning {float(task['before']):.3f})"}],
        })
    if summary.get("val_loss") is not None:
        results.append({
            "task": {"type": "text-generation"},
            "dataset": {"name": "validation split", "type": "validation"},
            "metrics": [{"type": "loss", "value": round(float(summary["val_loss"]), 4), "name": "validation loss"}],
        })
    return results


def introduction(facts: CardFacts) -> str:
    summary = facts.summary
    stage = (facts.recipe.get("stage") or {}).get("kind", "sft")
    share = ""
    if summary.get("trainable_parameters") and summary.get("total_parameters"):
        share = (f" ({summary['trainable_parameters']:,} trainable of {summary['total_parameters']:,} parameters, "
                 f"{100 * summary['trainable_parameters'] / summary['total_parameters']:.3f}%)")
    made = f"exported as {facts.export_format} from" if facts.export_format else "made by"
    return (f"`{facts.base_model}` fine-tuned with tunesmith: stage `{stage}`, method `{summary.get('method')}`"
            f"{share}. This folder was {made} the run `{facts.name}`.\n")


def recipe_section(facts: CardFacts) -> str:
    recipe = yaml.safe_dump(facts.recipe, sort_keys=False, allow_unicode=True)
    return f"## Training recipe\n\nRun again with `tunesmith train config.yaml`:\n\n```yaml\n{recipe}```\n"


def data_section(summary: dict[str, Any]) -> str:
    splits = summary.get("data") or {}
    if not splits:
        return ""
    rows = ["| split | records | examples kept | truncated | target tokens | longest |", "|---|---|---|---|---|---|"]
    for split, stats in splits.items():
        kept = stats.get("records", 0) - stats.get("dropped", 0) - stats.get("identical", 0) - stats.get("empty", 0)
        rows.append(f"| {split} | {stats.get('records', 0)} | {kept} | {stats.get('truncated', 0)} | "
                    f"{stats.get('target_tokens', 0)} | {stats.get('longest', 0)} |")
    return "## Data\n\n" + "\n".join(rows) + "\n"


def evaluation_section(summary: dict[str, Any]) -> str:
    rows = []
    task = summary.get("task")
    if task:
        rows.append(f"| {task['metric']} (held-out task) | {float(task['before']):.4f} | {float(task['after']):.4f} |")
    if summary.get("val_loss") is not None:
        rows.append(f"| validation loss | | {float(summary['val_loss']):.4f} |")
    if summary.get("val_perplexity") is not None:
        rows.append(f"| validation perplexity | | {float(summary['val_perplexity']):.4f} |")
    forgetting = summary.get("forgetting") or {}
    for name, value in flatten_config(forgetting).items():
        if isinstance(value, (int, float)):
            rows.append(f"| forgetting: {name} | | {value:.4f} |")
    if not rows:
        return ""
    return "## Evaluation\n\n| metric | before | after |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def cost_section(summary: dict[str, Any]) -> str:
    facts = [("steps", summary.get("steps")), ("tokens", summary.get("tokens")),
             ("wall time (s)", summary.get("wall_time_s")), ("tokens/s", summary.get("tokens_per_s")),
             ("peak memory (MB)", summary.get("peak_memory_mb")), ("processes", summary.get("world_size")),
             ("machine", summary.get("hardware") or f"{platform.machine()} {platform.system()}")]
    rows = [f"| {name} | {value} |" for name, value in facts if value is not None]
    return "## Hardware, time and memory\n\n| | |\n|---|---|\n" + "\n".join(rows) + "\n"


def checks_section(facts: CardFacts) -> str:
    if not facts.checks:
        return ""
    rows = [f"| {loader} | {verdict} |" for loader, verdict in facts.checks.items()]
    return ("## Export checks\n\nThe export was reloaded and compared with the trained model before it was kept:\n\n"
            "| loader | result |\n|---|---|\n" + "\n".join(rows) + "\n")


def hub_name(model: str) -> str:
    """A recipe's model as the Hub names it: a built-in alias becomes its hub id; anything else stays."""
    if model in ALIASES and ALIASES.get(model).hub_id:
        return ALIASES.get(model).hub_id
    return model


def run_card_facts(run: Path, checks: Optional[dict[str, str]] = None,
                   export_format: Optional[str] = None) -> Optional[CardFacts]:
    """What a finished run folder says about itself (None when it has no recipe or summary to read)."""
    layout = RunLayout(Path(run))
    if not (layout.config.is_file() and layout.summary.is_file()):
        return None
    recipe = yaml.safe_load(layout.config.read_text()) or {}
    base = hub_name(str((recipe.get("model") or {}).get("name", "unknown")))
    return CardFacts(layout.root.resolve().name, recipe, layout.read_summary().to_dict(), base, dict(checks or {}),
                     export_format)
