"""``report.html``: one self-contained page (plots embedded as base64 PNG) from a results document."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional

from tunesmith.core.files import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; } td, th { border: 1px solid #ccc; padding: .3rem .6rem; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #17702f; } .worse { color: #b0261b; } .cards { display: flex; gap: 1rem; }
.card { border: 1px solid #ccc; border-radius: .5rem; padding: .8rem 1.2rem; }
.card b { font-size: 1.6rem; display: block; } small { color: #666; }
"""


def figure_to_data_uri(figure) -> str:
    """A matplotlib figure as a ``data:image/png;base64`` URI (the page needs no other files)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the image goes into the page
    import matplotlib.pyplot as plt

    return plt


def bar_chart(labels: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    """Grouped bars, one group per label and one bar per series; returns a data URI."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2))
    width = 0.8 / max(len(series), 1)
    for offset, (name, values) in enumerate(series.items()):
        axis.bar([i + offset * width for i in range(len(labels))], values, width, label=name)
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=30, ha="right")
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.legend()
    return figure_to_data_uri(figure)


def loss_chart(training: dict) -> str:
    """The training (and validation) loss curve of a run's metrics.jsonl; returns a data URI."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    for key, label in (("loss_curve", "training loss"), ("val_curve", "validation loss")):
        points = training.get(key) or []
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("Training loss")
    axis.legend()
    return figure_to_data_uri(figure)


def fmt(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def rows_cell(cell: str) -> str:
    numeric = cell.lstrip("+-–").replace(".", "", 1).isdigit()
    return f'<td class="num">{cell}</td>' if numeric else f"<td>{cell}</td>"


def signed(value: Optional[float], digits: int = 2) -> str:
    """A change with its sign, coloured by whether it is better (positive) or worse."""
    if value is None:
        return "–"
    kind = "better" if value > 0 else "worse" if value < 0 else ""
    return f'<span class="{kind}">{value:+.{digits}f}</span>'


def comparison_section(comparison: dict) -> str:
    """The three headline numbers, the per-task table and its chart."""
    cards = "".join(
        f'<div class="card"><small>{html.escape(label)}</small><b>{signed(value)}</b><small>{html.escape(note)}</small></div>'
        for label, value, note in (
            ("task gain", comparison["task_gain"], "points, mean over task suite"),
            ("general change (forgetting)", comparison["general_change"], "points, mean over general suite"),
            ("bias change", None if comparison["bias_change"] is None else -comparison["bias_change"],
             "points of stereotype share, sign flipped: + is less biased"),
        ))
    rows = [[html.escape(r["suite"]), html.escape(r["task"]), html.escape(r["metric"]), fmt(r["base"]), fmt(r["tuned"]),
             signed(r["delta"], 4), signed(r["improvement"])] for r in comparison["rows"]]
    parts = [f'<div class="cards">{cards}</div>', "<h2>Per task</h2>",
             table(["suite", "task", "metric", "base", "tuned", "change", "improvement (points)"], rows)]
    if comparison["rows"]:
        labels = [r["task"] for r in comparison["rows"]]
        parts.append(f'<img alt="scores per task" src="{bar_chart(labels, {"base": [r["base"] for r in comparison["rows"]], "tuned": [r["tuned"] for r in comparison["rows"]]}, "Headline score per task", "score")}">')
    if comparison["bias_categories"]:
        categories = comparison["bias_categories"]
        rows = [[html.escape(c), fmt(v["base"], 3), fmt(v["tuned"], 3), signed(-v["delta"], 3)] for c, v in categories.items()]
        parts += ["<h2>Bias by category</h2><p>Share of pairs where the stereotypical sentence is more likely "
                  "(0.5 = no preference); change sign flipped so + is less stereotyped.</p>",
                  table(["category", "base", "tuned", "change"], rows),
                  f'<img alt="bias per category" src="{bar_chart(list(categories), {"base": [v["base"] for v in categories.values()], "tuned": [v["tuned"] for v in categories.values()]}, "Stereotype share per category", "share")}">']
    return "\n".join(parts)


def fmt_any(value) -> str:
    """A metric value of any kind (None for an undefined one, e.g. a win rate with no valid verdict)."""
    return "–" if value is None else f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _short(text: str, limit: int = 300) -> str:
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…")


def judge_section(name: str, result: dict) -> str:
    """A judge task: win rate with its interval and the length-controlled one (or the mean grade), and example items."""
    m = result["metrics"]
    if result["metric"] == "win_rate":
        line = (f"win rate <b>{fmt(m['win_rate'], 3)}</b> (95% bootstrap interval {fmt(m['win_rate_ci_low'], 3)}–"
                f"{fmt(m['win_rate_ci_high'], 3)}), length-controlled {fmt(m['lc_win_rate'], 3)}; "
                f"{m['wins']} wins, {m['losses']} losses, {m['ties']} ties, {m['invalid']} invalid verdicts; "
                f"the two orders agree on {fmt(m['order_agreement'], 3)} of the pairs")
        rows = [[_short(s["prompt"]), _short(s["answer"]), _short(s["against"]), html.escape(s["outcome"]),
                 _short(" | ".join(s["verdicts"]), 200)] for s in result["samples"]]
        examples = table(["question", "this model", "against", "outcome", "judge's raw verdicts (both orders)"], rows)
    else:
        line = (f"mean grade <b>{fmt(m['mean_grade'], 2)}</b> / 10 (95% bootstrap interval "
                f"{fmt(m['mean_grade_ci_low'], 2)}–{fmt(m['mean_grade_ci_high'], 2)}); {m['invalid']} invalid verdicts")
        rows = [[_short(s["prompt"]), _short(s["answer"]), fmt(s["score"], 1), _short(s["verdicts"][0], 200)]
                for s in result["samples"]]
        examples = table(["question", "answer", "grade", "judge's raw verdict"], rows)
    judge = html.escape(str(result["details"].get("judge", "")))
    return (f"<details open><summary>{html.escape(name)}: judged by {judge}</summary><p>{line}</p>"
            f"{examples}</details>")


def run_section(run_name: str, run: dict) -> str:
    """Every suite and task of one evaluated model, with per-group tables and tokenisation notes."""
    model = run["model"]
    parts = [f"<h2>{html.escape(run_name)}: {html.escape(str(model['name']))}"
             f"{' + ' + html.escape(str(model['adapter'])) if model.get('adapter') else ''}</h2>",
             f"<p><small>chat template: {html.escape(str(model.get('template')))}</small></p>"]
    for suite_name, suite in run["suites"].items():
        rows = [[html.escape(name), html.escape(r["kind"]), html.escape(r["metric"]), fmt(r["score"]), str(r["count"]),
                 html.escape(", ".join(f"{k} {fmt_any(v)}" for k, v in r["metrics"].items()))]
                for name, r in suite["tasks"].items()]
        parts += [f"<h3>suite {html.escape(suite_name)} <small>({html.escape(suite.get('role', ''))})</small></h3>",
                  table(["task", "kind", "metric", "score", "items", "all metrics"], rows)]
        for name, result in suite["tasks"].items():
            groups = result["details"].get("groups")
            if groups:
                keys = [k for k in next(iter(groups.values())) if k != "count"]
                rows = [[html.escape(g), *[fmt(v[k]) for k in keys], str(v["count"])] for g, v in groups.items()]
                parts.append(f"<details><summary>{html.escape(name)} by group</summary>"
                             f"{table(['group', *keys, 'count'], rows)}</details>")
            if result["kind"] == "judge":
                parts.append(judge_section(name, result))
            parts.append(f"<details><summary>{html.escape(name)}: how it tokenises</summary><pre>"
                         f"{html.escape(repr(result['tokenisation']))}</pre></details>")
    return "\n".join(parts)


def render_report(document: dict) -> str:
    """The whole page as a string."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tunesmith evaluation</title>",
             f"<style>{STYLE}</style></head><body><h1>tunesmith evaluation report</h1>",
             f"<p><small>created {html.escape(document['created'])}, tunesmith {html.escape(document['tunesmith_version'])}, "
             f"results schema {document['schema_version']}</small></p>"]
    if document.get("comparison"):
        parts.append(comparison_section(document["comparison"]))
    training = document.get("training")
    if training and training.get("loss_curve"):
        parts += ["<h2>Training</h2>", f'<img alt="training loss" src="{loss_chart(training)}">']
    for run_name, run in document["runs"].items():
        parts.append(run_section(run_name, run))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(document: dict, path: Path) -> Path:
    """Write ``report.html`` next to the results (temporary sibling, then rename)."""
    return write_text_atomic(path, render_report(document))
