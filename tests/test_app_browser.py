"""app.py in a real browser: Debian's chromium driven by playwright.

Waits for the checkpoint to open (Generate is disabled until then), clicks Generate, watches
the text stream until no placeholder is left, checks that the final frame keeps its
colours and tooltips, replays call 0 with the slider, compares two methods side by side,
stops a long run, shows an error in the output area, and saves screenshots to artifacts/.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

import test_app  # noqa: E402  (same folder: pytest puts it on sys.path)

from jif import render  # noqa: E402

fake_server = test_app.fake_server  # the page over a fake denoiser with a known answer

CHROMIUM = os.environ.get("JIF_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(
            f"no chromium at {CHROMIUM}: install Debian's with `apt-get install -y chromium`"
        )
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(str(value))
    box.press("Tab")


def watch(page, selector: str, done, seconds: float = 90) -> list[str]:
    """Every distinct innerHTML of `selector` until done(html) (or the time is up)."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        html = page.locator(selector).inner_html()
        if not seen or html != seen[-1]:
            seen.append(html)
        if done(html):
            break
        time.sleep(0.02)
    return seen


def test_page_streams_keeps_colours_compares_stops(fake_server, browser, monkeypatch):
    _, url, _, _, loaded = fake_server
    tok = loaded.tokenizer
    row = test_app.encode_template(tok, test_app.app.DEFAULT_TEMPLATE, length=64)
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1300, "height": 1500})
    page.goto(url)
    page.wait_for_selector("#jif-generate:not([disabled])", timeout=120_000)  # opened
    set_number(page, "#jif-replay", 0)  # nothing to replay yet: the page stays usable
    page.click("#jif-generate")
    final = lambda h: render.SAMPLE_CLASS in h and render.PLACEHOLDER_CLASS not in h
    seen = watch(page, "#jif-text", final)
    streamed = [h for h in seen if render.PLACEHOLDER_CLASS in h and render.SAMPLE_CLASS in h]
    assert len(streamed) >= 3, f"only {len(streamed)} animation frames seen"
    counts = [h.count(render.PLACEHOLDER_CLASS) for h in streamed]
    assert counts == sorted(counts, reverse=True), "placeholders only ever disappear"
    last = seen[-1]
    assert render.PLACEHOLDER_CLASS not in last, "the animation ended with masks left"
    assert last.count(render.TOKEN_CLASS) > 0 and "background:#" in last, "final frame coloured"
    assert render.FIXED_CLASS in last, "the template's text is marked"
    title = page.locator(f"#jif-text .{render.TOKEN_CLASS}").first.get_attribute("title")
    assert "revealed by network call" in title and "top tokens" in title
    page.wait_for_selector("#jif-scores table", timeout=30_000)  # the summary comes last
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

    # Colour by confidence, then replay call 0: the template comes back, no sampling again.
    page.get_by_label("confidence", exact=True).check()
    page.wait_for_function(
        "document.querySelector('#jif-text').innerHTML.includes('sampled with p:')",
        timeout=30_000,
    )
    set_number(page, "#jif-replay", 0)
    page.wait_for_function(
        "document.querySelector('#jif-text').innerHTML.includes('after network call 0 ')",
        timeout=30_000,
    )
    at0 = page.locator("#jif-text").inner_html().count(render.PLACEHOLDER_CLASS)
    assert at0 == 2 * int((row == tok.mask_id).sum()) >= counts[0]

    # Compare: a second method in the column beside, each with its own summary row.
    page.get_by_text("Compare", exact=True).click()
    page.locator("#jif-compare input").check()
    page.click("#jif-generate")
    both = lambda h: "B: ddpm_cache" in h and "· done" in h
    watch(page, "#jif-text-b", both)
    page.wait_for_function(
        "document.querySelector('#jif-scores').innerText.includes('B: ddpm_cache')",
        timeout=60_000,
    )
    page.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)
    page.locator("#jif-compare input").uncheck()

    # Stop: a 2000-step run (slowed to 20 ms a call) ends where it is, its last frame kept.
    push = test_app.live.LiveRun._push
    slow = lambda run, call: (time.sleep(0.02), push(run, call))
    monkeypatch.setattr(test_app.live.LiveRun, "_push", slow)
    set_number(page, "#jif-steps", 2000)
    method = page.locator("#jif-method input")
    method.fill("ddpm")
    method.press("Enter")
    page.click("#jif-generate")
    page.wait_for_selector("#jif-stop:not([disabled])", timeout=60_000)
    watch(page, "#jif-text", lambda h: "· running" in h, 60)
    page.click("#jif-stop")
    seen = watch(page, "#jif-text", lambda h: "· stopped" in h, 60)
    assert "· stopped" in seen[-1] and render.SAMPLE_CLASS in seen[-1]
    monkeypatch.undo()
    page.screenshot(path=str(ARTIFACTS / "app_stopped.png"), full_page=True)

    # A mistake stays in the output area, with its message, until the next Generate.
    template = page.locator("#jif-template textarea")
    template.fill("Tom [mask:3]")
    page.click("#jif-generate")
    page.wait_for_selector(f"#jif-text .{render.ERROR_CLASS}", timeout=30_000)
    assert "write [MASK]" in page.locator("#jif-text").inner_text()
    time.sleep(6)  # longer than a toast lives
    assert "write [MASK]" in page.locator("#jif-text").inner_text()
    page.screenshot(path=str(ARTIFACTS / "app_error.png"), full_page=True)
    page.close()
