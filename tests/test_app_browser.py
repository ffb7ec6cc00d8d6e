"""app.py in a real browser: Debian's chromium driven by playwright.

Clicks Generate, watches the text change over several frames until no placeholder is left,
replays step 0 with the slider, and saves a screenshot to artifacts/app.png.
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


def test_generate_animates_until_no_placeholder(fake_server, browser):
    _, url, _, _, _ = fake_server
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    page.goto(url)
    page.wait_for_selector("#jif-generate")
    text = page.locator("#jif-text")
    page.click("#jif-generate")

    seen, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        html = text.inner_html()
        if not seen or html != seen[-1]:
            seen.append(html)
            if sum(render.PLACEHOLDER_CLASS in h for h in seen) == 6:  # mid-animation
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "app_animating.png"), full_page=True)
        if render.SAMPLE_CLASS in html and render.PLACEHOLDER_CLASS not in html:
            break
        time.sleep(0.02)
    with_placeholders = [h for h in seen if render.PLACEHOLDER_CLASS in h]
    assert len(with_placeholders) >= 3, f"only {len(with_placeholders)} animation frames seen"
    assert render.PLACEHOLDER_CLASS not in seen[-1], "the animation ended with masks left"
    counts = [
        h.count(render.PLACEHOLDER_CLASS) for h in with_placeholders if render.SAMPLE_CLASS in h
    ]
    assert counts == sorted(counts, reverse=True), "placeholders only ever disappear"
    page.wait_for_selector("#jif-scores table", timeout=30_000)  # grammar scores drawn last

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

    # Replay: move the step slider back to 0; the template comes back without sampling again.
    box = page.locator("#jif-replay input[type=number]")
    box.fill("0")
    box.press("Enter")
    page.wait_for_function(
        "document.querySelector('#jif-text').innerHTML.includes('step 0 /')", timeout=30_000
    )
    assert text.inner_html().count(render.PLACEHOLDER_CLASS) == counts[0]
    page.close()
