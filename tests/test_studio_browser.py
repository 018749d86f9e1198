"""The studio in real headless Chromium (Debian's ``chromium`` through Playwright), the whole flow on
the tests' tiny Llama: upload -> preview -> recipe form -> train with a live curve -> chat side by side with a
preference click -> compare two runs -> export (hf, then GGUF) -> sweep -> evaluate (report in the page).

Screenshots go to a temporary folder; to refresh the ones in the docs run
``TUNESMITH_STUDIO_SCREENSHOTS=docs/studio python -m pytest tests/test_studio_browser.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")

from serve_support import BASE, Server, make_workspace  # noqa: E402

pytestmark = pytest.mark.slow
sync_api.expect.set_options(timeout=90_000)  # a busy CI machine: jobs start a Python process each
CHROMIUM = Path(os.environ.get("TUNESMITH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INJECTED = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"


@pytest.fixture
def studio(tmp_path, tiny_llama, tiny_data):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium, or set TUNESMITH_CHROMIUM)")
    workspace = make_workspace(tmp_path / "workspace", tiny_llama, tiny_data, records=0)
    rows = json.loads(Path(tiny_data).read_text())[:63] + [{"instruction": INJECTED, "input": "", "output": INJECTED}]
    upload = tmp_path / "my stories.jsonl"
    upload.write_text("".join(json.dumps(row) + "\n" for row in rows[::-1]))  # the injected row first
    server = Server(workspace).start()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, server, workspace, upload, errors
        browser.close()
    server.stop()


def expect(page, selector: str):
    """Playwright's waiting assertions (they do not evaluate strings, which the studio's CSP forbids)."""
    return sync_api.expect(page.locator(selector).first)


def shoot(page, name: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))
    target = os.environ.get("TUNESMITH_STUDIO_SCREENSHOTS")
    if target:  # for the docs: a 64-colour palette keeps each picture small
        from PIL import Image

        Path(target).mkdir(parents=True, exist_ok=True)
        Image.open(folder / f"{name}.png").convert("RGB").quantize(colors=64).save(Path(target) / f"{name}.png", optimize=True)


def train_in_browser(page, run: str, lr: str) -> list[tuple[str, int]]:
    """Fill the run name and learning rate, press Train, follow the live screen until the job ends."""
    page.click("button[data-screen=recipe]")
    page.fill("#run-name", run)
    page.fill('[data-path="train.lr"]', lr)
    expect(page, "#recipe-yaml").to_contain_text(f"runs/{run}")
    page.click("#train-button")
    expect(page, "#train-job").to_contain_text(f"train {run}")
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        status = page.get_attribute("#train-job", "data-status") or ""
        points = int(page.get_attribute("#train-chart", "data-points") or 0)
        seen.append((status, points))
        if status in ("done", "failed", "stopped"):
            break
        time.sleep(0.25)
    expect(page, "#train-chart").to_have_attribute("data-points", "60")  # the last poll landed
    return seen


def run_job_on_screen(page, screen: str, run: str, prefix: str | None = None) -> None:
    """Open ``screen``, pick ``run``, press its button and wait until the job is done."""
    prefix = prefix or screen
    page.click(f"button[data-screen={screen}]")
    page.wait_for_selector(f'#{prefix}-run option[value="{run}"]', state="attached")
    page.select_option(f"#{prefix}-run", run)
    page.click(f"#{prefix}-button")
    expect(page, f"#{prefix}-status").to_contain_text(" done", timeout=180_000)


def test_studio_whole_flow(studio, tmp_path):
    page, server, workspace, upload, errors = studio
    shots = tmp_path / "screenshots"
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")

    # Data: upload, preview as a table and as chat bubbles, inspect; the injected row shows as text
    page.set_input_files("#upload-file", str(upload))
    page.click("#upload-button")
    page.wait_for_selector("#preview-table td")
    assert page.locator("#preview-table td", has_text="<script>window.pwned = 1</script>").count() == 2
    assert page.locator("#preview-bubbles .bubble", has_text="<script>").count() >= 1
    assert page.evaluate("window.pwned") is None and page.locator("#preview-table img").count() == 0
    page.click("#inspect-button")
    expect(page, "#inspect-report").to_contain_text("64 records give 64 training examples")
    shoot(page, "data", shots)

    # Recipe: the form from the schema; an error appears at its field; the YAML follows the form
    page.click("#use-data-button")
    page.click("#full-form summary")  # the whole schema form, one click away from the guided path
    page.fill('[data-path="train.max_steps"]', "60")
    page.fill('[data-path="train.lr"]', "-1")
    expect(page, "[data-error-for=\"train.lr\"]").to_contain_text("greater than 0")
    page.select_option('[data-path="method.kind"]', "ia3")
    assert page.locator('[data-path="method.r"]').count() == 0  # the method section switched with kind
    page.select_option('[data-path="method.kind"]', "lora")
    page.fill('[data-path="method.r"]', "4")
    page.fill('[data-path="train.lr"]', "0.002")
    expect(page, '[data-error-for="train.lr"]').to_have_text("")
    page.fill("#run-name", "first-run")
    expect(page, "#recipe-yaml").to_contain_text("runs/first-run")
    assert "data/my-stories.jsonl" in page.inner_text("#recipe-yaml") and "lr: 0.002" in page.inner_text("#recipe-yaml")
    shoot(page, "recipe", shots)

    # Plan
    page.click("#plan-button")
    page.wait_for_selector("#plan-table td", timeout=120_000)  # the server imports the model classes on first use
    shown = page.inner_text("#plan-table")
    assert "315,920" in shown and "23,120" in shown and "peak memory" in shown  # tunesmith plan's own figures
    shoot(page, "plan", shots)

    # Train twice with a live curve; the second run differs in its learning rate
    seen = train_in_browser(page, "first-run", "0.002")
    assert seen[-1][0] == "done", page.inner_text("#train-log")[-1500:]
    assert any(status == "running" and 0 < points < 60 for status, points in seen), seen  # drawn while training
    shoot(page, "train", shots)
    assert train_in_browser(page, "second-run", "0.02")[-1][0] == "done"

    # Chat: base and tuned side by side, streaming; a preference click appends a pair
    page.click("button[data-screen=chat]")
    page.wait_for_selector('#chat-right option[value="runs/first-run"]', state="attached")
    page.select_option("#chat-left", BASE)
    page.select_option("#chat-right", "runs/first-run")
    page.fill("#chat-input", "Give three tips for staying healthy.")
    page.click("#chat-send")
    page.wait_for_selector("#prefer-left:enabled")
    left, right = (page.locator(f"#chat-{side}-log .bubble.assistant").last.inner_text() for side in ("left", "right"))
    page.click("#prefer-right")
    expect(page, "#preference-status").to_contain_text("1 preference pair saved")
    pair = json.loads((workspace / "data" / "preferences.jsonl").read_text())
    assert pair["prompt"] == "Give three tips for staying healthy."
    assert (pair["chosen"], pair["rejected"]) == (right.strip(), left.strip())
    shoot(page, "chat", shots)

    # Runs: history of jobs; two runs compared (curves, metrics, recipe diff)
    page.click("button[data-screen=runs]")
    page.wait_for_selector('.compare-pick[value="runs/second-run"]')
    page.check('.compare-pick[value="runs/first-run"]')
    page.check('.compare-pick[value="runs/second-run"]')
    page.click("#compare-button")
    expect(page, "#recipe-diff").to_contain_text("lr: 0.02")
    assert "second-run" in page.inner_text("#compare-table") and page.locator("#jobs-table tr").count() == 3
    shoot(page, "runs", shots)

    # Export: merged into a plain model folder, then as GGUF q8_0 with a Modelfile, each a job that checks itself
    run_job_on_screen(page, "export", "runs/first-run")
    assert (workspace / "exports" / "first-run-merged" / "config.json").is_file()
    assert "exports/first-run-merged" in page.inner_text("#exports-list")
    expect(page, "#export-report").to_contain_text("transformers: max |logit difference|")
    assert page.is_disabled("#export-quantize")
    page.select_option("#export-format", "gguf")
    page.select_option("#export-quantize", "q8_0")
    page.check("#export-ollama")
    page.click("#export-button")
    expect(page, "#export-status").to_contain_text("done: exports/first-run-gguf-q8_0", timeout=180_000)
    gguf = workspace / "exports" / "first-run-gguf-q8_0"
    assert sorted(p.name for p in gguf.iterdir()) == ["Modelfile", "README.md", "model-q8_0.gguf"]  # README: the model card
    report = page.inner_text("#export-report")
    assert "exported lora result as gguf q8_0" in report and "transformers: max |logit difference|" in report
    assert "llama.cpp: " in report  # checked by llama.cpp, or the reason it was not (node-llama-cpp missing)
    shoot(page, "export", shots)

    # Sweep: two trials of the form's recipe (with validation data held out) as a job; the table and plot shown
    page.click("button[data-screen=recipe]")
    page.fill('[data-path="data.validation_fraction"]', "0.25")
    page.fill('[data-path="train.max_steps"]', "4")
    page.fill("#run-name", "sweep-base")
    expect(page, "#recipe-yaml").to_contain_text("validation_fraction: 0.25")
    page.click("button[data-screen=sweep]")
    page.fill("#sweep-trials", "2")
    page.fill("#sweep-workers", "2")  # two worker processes share the study
    page.click("#sweep-button")
    expect(page, "#sweep-status").to_have_attribute("data-status", "done", timeout=240_000)
    table = page.inner_text("#sweep-trials-table")
    assert "| 0 | complete |" in table and "| 1 |" in table, table
    assert "trial 1: train.lr=" in page.inner_text("#sweep-log")
    sweep_folder = workspace / "runs" / "sweep-base-sweep"
    assert (sweep_folder / "best.yaml").is_file() and (sweep_folder / "trial-001" / "summary.json").is_file()
    shoot(page, "sweep", shots)

    # Evaluate: base vs tuned (the bias probe) as a job; its report.html opened in the page
    run_job_on_screen(page, "evaluate", "runs/first-run", prefix="eval")
    sync_api.expect(page.frame_locator("#report-frame").locator("body")).to_contain_text("stereotype")
    shoot(page, "evaluate", shots)
    assert errors == []


# --- the journey of issue 24: a spreadsheet of headlines -> a classifier in the person's hands --------------------

AXE = Path(os.environ.get("TUNESMITH_AXE", Path.home() / ".cache/tunesmith/axe/node_modules/axe-core/axe.min.js"))
TOPIC_WORDS = {"sport": ["match", "goal", "team", "league", "coach"], "politics": ["vote", "minister", "election", "law", "party"],
               "science": ["study", "cells", "space", "physics", "planet"], "business": ["market", "shares", "profit", "bank", "trade"]}


def headline_table(path: Path, rows: int, seed: int) -> None:
    """A CSV ``headline,topic`` whose column names match no data format (as a spreadsheet export has them)."""
    import csv
    import random

    pick = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8-sig") as handle:  # Excel's CSV export starts with a BOM
        writer = csv.writer(handle)
        writer.writerow(["headline", "topic"])
        for _ in range(rows):
            topic = pick.choice(list(TOPIC_WORDS))
            first, second = pick.sample(TOPIC_WORDS[topic], 2)
            writer.writerow([f"The {first} news: what the {second} means this week", topic])


class Person:
    """Playwright playing the person: every click and typed field is counted."""

    def __init__(self, page) -> None:
        self.page, self.clicks, self.typed = page, 0, 0

    def click(self, selector: str, **options) -> None:
        self.clicks += 1
        self.page.click(selector, **options)

    def type(self, selector: str, text: str) -> None:
        self.typed += 1
        self.page.fill(selector, text)

    def files(self, selector: str, paths: list[str]) -> None:
        self.typed += 1
        self.page.set_input_files(selector, paths)


def accessibility_violations(page) -> list[str]:
    """axe-core's serious and critical violations on the screen as it is now."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=AXE.read_text())
    results = page.evaluate("async () => (await window.axe.run(document, {resultTypes: ['violations']})).violations"
                            ".filter(v => ['serious', 'critical'].includes(v.impact))"
                            ".map(v => `${v.id}: ${v.help} (${v.nodes.slice(0, 3).map(n => n.target.join(' ')).join('; ')})`)")
    return results


@pytest.fixture
def journey(tmp_path, tiny_llama):
    import shutil

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium, or set TUNESMITH_CHROMIUM)")
    if not AXE.is_file():
        pytest.skip(f"{AXE} is missing (npm install axe-core, see .ci/run, or set TUNESMITH_AXE)")
    workspace = tmp_path / "workspace"
    shutil.copytree(tiny_llama, workspace / "models" / "tiny")
    headline_table(tmp_path / "headlines.csv", 240, seed=1)
    headline_table(tmp_path / "headlines-test.csv", 60, seed=2)
    server = Server(workspace).start()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # bypass_csp: only so that the test can load axe-core into the page; the studio's own scripts run as always
        context = browser.new_context(viewport={"width": 1180, "height": 860}, accept_downloads=True, bypass_csp=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, server, workspace, tmp_path, errors
        browser.close()
    server.stop()


def test_journey_from_a_spreadsheet_to_a_downloaded_classifier(journey):
    import zipfile

    page, server, workspace, folder, errors = journey
    shots = folder / "screenshots"
    person = Person(page)
    violations: dict[str, list[str]] = {}
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")

    # Data: both files in one upload; the columns are guessed and shown, the rows as the model will see them
    person.files("#upload-file", [str(folder / "headlines.csv"), str(folder / "headlines-test.csv")])
    person.click("#upload-button")
    expect(page, "#data-format").to_contain_text("prompt = headline, label = topic")
    assert page.input_value("#col-prompt") == "headline" and page.input_value("#col-label") == "topic"
    assert page.input_value("#data-file") == "data/headlines.csv"
    assert page.input_value("#test-file") == "data/headlines-test.csv"
    assert page.locator("#preview-bubbles .bubble.assistant").first.inner_text() in TOPIC_WORDS
    expect(page, "#inspect-report").to_contain_text("240 records give 240 training examples")
    assert str(workspace) not in page.inner_text("body")
    shoot(page, "journey-data", shots)
    violations["data"] = accessibility_violations(page)

    # Recipe: the task in the person's words; the server fills everything else
    person.click("#use-data-button")
    page.wait_for_selector("#guided-tasks input[value=label]")
    violations["recipe"] = accessibility_violations(page)
    person.click("#guided-tasks input[value=label]")
    expect(page, "#guided-status").to_contain_text("ready: runs/headlines-label")
    reasons = page.inner_text("#guided-reasons")
    assert "column 'headline'" in reasons and "column 'topic'" in reasons and "the 60 rows of data/headlines-test.csv" in reasons
    shoot(page, "journey-recipe", shots)

    # Train: a status line from the first second, the ETA only from measured steps, the result before -> after
    person.click("#train-button")
    started, statuses = time.time(), []
    page.wait_for_selector("#train-status:not(:empty)", timeout=2000)
    first_status = (time.time() - started, page.inner_text("#train-status"))
    while time.time() - started < 300 and page.get_attribute("#train-job", "data-status") not in ("done", "failed"):
        text = page.inner_text("#train-status")
        if not statuses or statuses[-1] != text:
            statuses.append(text)
        time.sleep(0.2)
    assert page.get_attribute("#train-job", "data-status") == "done", page.inner_text("#train-log")[-2000:]
    assert first_status[0] < 2 and first_status[1], first_status
    assert any("loading the model" in s or "measuring the base model" in s for s in statuses), statuses
    assert all("left" not in s for s in statuses if "training" not in s), statuses  # no ETA before steps are measured
    expect(page, "#train-result").to_contain_text("→")
    result = page.inner_text("#train-result")
    summary = json.loads((workspace / "runs" / "headlines-label" / "summary.json").read_text())["validation"]
    assert f"{100 * summary['accuracy']:.0f}% after training" in result and "before training" in result
    assert summary["accuracy"] > summary["zero_shot_accuracy"], summary
    sync_api.expect(page.locator("#train-examples tr")).to_have_count(6)  # a few held-out rows: their label, the model's
    assert page.get_attribute("#train-examples", "data-source") == "data/headlines-test.csv"
    shoot(page, "journey-train", shots)
    violations["train"] = accessibility_violations(page)

    # Try it: a typed headline labelled through the trained head (the same label tunesmith classify gives)
    person.click("button[data-screen=try]")
    page.wait_for_selector('#try-model option[value="runs/headlines-label"]', state="attached")
    headline = "The goal news: what the coach means this week"
    person.type("#try-input", headline)
    person.click("#try-button")
    expect(page, "#try-table td strong").to_have_count(1)
    shown = page.inner_text("#try-table td strong")
    from tunesmith.stages.cls import classify, load_classifier

    model, tokenizer, labels = load_classifier(workspace / "runs" / "headlines-label" / "adapter")
    assert shown == classify(model, tokenizer, [headline], labels)[0]
    shoot(page, "journey-try", shots)
    violations["try"] = accessibility_violations(page)

    # Export (hf keeps the head and the labels) and download it as one archive
    person.click("button[data-screen=export]")
    page.wait_for_selector('#export-run option[value="runs/headlines-label"]', state="attached")
    assert page.input_value("#export-run") == "runs/headlines-label"
    person.click("#export-button")
    expect(page, "#export-status").to_have_attribute("data-status", "done", timeout=180_000)
    expect(page, "#export-report").to_contain_text("head: head.safetensors and labels.json reloaded: 4 labels")
    with page.expect_download() as waiting:
        person.click("#export-download")
    archive = folder / "downloaded.zip"
    waiting.value.save_as(archive)
    names = zipfile.ZipFile(archive).namelist()
    assert {"headlines-label-merged/head.safetensors", "headlines-label-merged/labels.json",
            "headlines-label-merged/model.safetensors"} <= set(names), names
    shoot(page, "journey-export", shots)
    violations["export"] = accessibility_violations(page)

    # The other screens, the 400 px layout and the keyboard: the skip link is the first stop
    for screen in ("plan", "evaluate", "chat", "runs", "sweep"):
        page.click(f"button[data-screen={screen}]")
        violations[screen] = accessibility_violations(page)
    page.set_viewport_size({"width": 400, "height": 860})
    page.click("button[data-screen=data]")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 400
    shoot(page, "journey-narrow", shots)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip-link"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main"
    report = {"clicks": person.clicks, "typed_fields": person.typed, "statuses": statuses, "result": result,
              "accessibility": violations}
    for target in filter(None, [shots, os.environ.get("TUNESMITH_STUDIO_SCREENSHOTS")]):
        (Path(target) / "journey.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    assert {screen: found for screen, found in violations.items() if found} == {}
    assert person.clicks <= 15 and person.typed <= 3, report
    assert errors == []


def test_every_stage_from_the_studio(journey):
    """Issue 24 §7 on screen: practice with built-in rewards (GRPO) and the preference methods from the guided path,
    Constitutional-AI data made as a job on the Data screen, suites picked from a list on Evaluate; axe-core on each."""
    import shutil

    from conftest import REPO

    page, server, workspace, folder, errors = journey
    (workspace / "data").mkdir(exist_ok=True)
    for name in ("principles.jsonl", "prompts.jsonl"):
        shutil.copy(REPO / "examples" / "cai" / name, workspace / "data" / name)
    rows = [{"question": f"What is {i} plus {i}?", "result": str(2 * i)} for i in range(12)]
    (workspace / "data" / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (workspace / "suites").mkdir()
    (workspace / "suites" / "quick.yaml").write_text("name: quick\ntasks:\n  - {name: bias, kind: bias, path: "
                                                      "'{probes}/counterfactual_pairs.csv'}\n")
    (workspace / "suites" / "outside.yaml").write_text("name: outside\ndata_root: /etc\ntasks:\n  - x.yaml\n")
    violations: dict[str, list[str]] = {}
    page.goto(server.url + "/#screen=data&data=data/sums.jsonl&prompt=question&answer=result")
    page.wait_for_selector("body[data-ready=true]")

    # Data: Constitutional-AI data as a job, its files named when it ends
    page.click("#cai summary")
    expect(page, "#cai-prompts").to_have_value("data/prompts.jsonl")
    assert page.input_value("#cai-principles") == "data/principles.jsonl"
    page.select_option("#cai-model", "models/tiny")
    page.fill("#cai-limit", "1")
    violations["data (cai)"] = accessibility_violations(page)
    page.click("#cai-button")
    expect(page, "#cai-status").to_contain_text("done: data/prompts-cai/sft.jsonl", timeout=240_000)
    assert (workspace / "data" / "prompts-cai" / "preference.jsonl").is_file()

    # Recipe: practice with built-in rewards; the preference method is a list
    page.click("#tabs button[data-screen=recipe]")
    page.wait_for_selector("#guided-tasks input[value=practise]")
    page.click("#guided-tasks input[value=practise]")
    expect(page, "#guided-status").to_contain_text("ready: runs/sums-practise")
    assert page.is_visible("#guided-rewards") and not page.is_visible("#guided-prefer")
    assert "(exact_match)" in page.inner_text("#guided-reasons")
    page.check("#reward-length")
    page.click("#guided-again")
    expect(page, "#guided-reasons").to_contain_text("exact_match, length")
    assert "exact_match, length" in page.inner_text("#guided-reasons")
    violations["recipe (practise)"] = accessibility_violations(page)
    options = page.locator("#guided-preference option").all_inner_texts()
    assert [o.split(" ")[0] for o in options] == ["DPO", "ORPO", "SimPO", "KTO"]

    # Evaluate: the suites of the workspace, one that cannot run shown with its reason and not selectable
    page.click("#tabs button[data-screen=evaluate]")
    expect(page, "#eval-suite-list").to_contain_text("quick")
    assert page.is_enabled(".eval-suite[value='suites/quick.yaml']")
    assert page.is_disabled(".eval-suite[value='suites/outside.yaml']")
    assert "outside the workspace" in page.inner_text("#eval-suite-list")
    violations["evaluate (suites)"] = accessibility_violations(page)
    assert str(workspace) not in page.inner_text("body")  # (the Train screen's job log below shows its command line)

    # A generation task measured on its own metric: exact match before -> after, and the same inputs answered by both
    rows = "".join(f"Say the word {word},{word}\n" for word in ("alpha", "beta", "gamma", "delta") * 5)
    for name in ("words.csv", "words-test.csv"):
        (workspace / "data" / name).write_text("text,reply\n" + rows)
    page.goto(server.url + "/#screen=recipe&data=data/words.csv&test=data/words-test.csv&prompt=text&answer=reply")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#guided-tasks input[value=answer]")
    expect(page, "#guided-status").to_contain_text("ready: runs/words-answer")
    assert "exact_match of the model's answers" in page.inner_text("#guided-reasons")
    page.click("#train-button")
    expect(page, "#train-result").to_contain_text("exact_match: ", timeout=300_000)
    assert "before →" in page.inner_text("#train-result")
    expect(page, "#train-examples").to_contain_text("before training")
    cells = page.locator("#train-examples tr").nth(1).locator("td").all_inner_texts()
    assert cells[0].startswith("Say the word") and cells[3] in ("alpha", "beta", "gamma", "delta")
    violations["train (generation examples)"] = accessibility_violations(page)
    assert not errors, errors
    assert not any(violations.values()), violations
