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
    expect(page, "#inspect-report").to_contain_text("64 records")
    shoot(page, "data", shots)

    # Recipe: the form from the schema; an error appears at its field; the YAML follows the form
    page.click("#use-data-button")
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
    assert "data/upload-" in page.inner_text("#recipe-yaml") and "lr: 0.002" in page.inner_text("#recipe-yaml")
    shoot(page, "recipe", shots)

    # Plan
    page.click("#plan-button")
    page.wait_for_selector("#plan-table td")
    assert "292,800" in page.inner_text("#plan-table")
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
    expect(page, "#preference-status").to_contain_text("1 pairs")
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
    assert sorted(p.name for p in gguf.iterdir()) == ["Modelfile", "model-q8_0.gguf"]
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
