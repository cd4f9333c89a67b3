"""`forkrl report`: a self-contained HTML page and PNGs from a real (tiny) run, checked as text and
rendered in headless Chromium."""
import os
import re
import shutil
from html.parser import HTMLParser

import pytest

from forkrl.cli import main
from forkrl.train import Trainer
from tests.test_trainer import _cfg


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    cfg = _cfg(tmp_path, train={"steps": 4}, eval={"at_start": True, "every": 1, "size": 4})
    Trainer(cfg).train()
    assert main(["report", cfg.output_dir]) == 0
    return tmp_path / "run" / "report.html"


def test_report_from_a_tiny_run(report):
    page = report.read_text()
    HTMLParser().feed(page)  # well-formed enough to parse
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 5 and all(len(i) > 1000 for i in images)        # embedded, not linked
    pngs = sorted(p.name for p in (report.parent / "report").glob("*.png"))
    assert {"reward.png", "entropy.png", "entropy_change.png", "clipping.png", "length.png"} <= set(pngs)
    assert page.count('title="H = ') > 10                                 # tokens shaded by entropy
    assert "Fitted law" in page or "needs three held-out evaluations" in page


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_renders_every_plot_in_headless_chromium(report, tmp_path):
    # scripts/setup.sh installs Debian's chromium; CI sets FORKRL_REQUIRE_BROWSER so a missing one fails
    exe = _chromium()
    if exe is None or not _has_playwright():
        if os.environ.get("FORKRL_REQUIRE_BROWSER"):
            pytest.fail("headless Chromium and playwright are required (FORKRL_REQUIRE_BROWSER is set)")
        pytest.skip("no chromium on PATH (apt-get install chromium) or no playwright")
    from playwright.sync_api import sync_playwright

    messages, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri(), wait_until="load")
        images = page.evaluate("""() => Array.from(document.images).map(i => ({
            alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
            shown: i.getBoundingClientRect().width}))""")
        shaded = page.locator("span[title^='H = ']").count()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert not [m for m in messages if m.startswith(("error", "warning"))], messages
    assert len(images) >= 5
    for img in images:  # decoded by the browser and laid out at a visible size
        assert img["complete"] and img["width"] > 100 and img["height"] > 100 and img["shown"] > 100, img
    assert shaded > 10
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
        return True
    except ImportError:
        return False
