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
    # a summary first: recipe, held-out before/after, wall time, final entropy, the law
    head = page[:page.index('<div class="grid">')]
    for row in ("recipe", "held-out accuracy", "wall time", "final sampling entropy", "entropy–reward law"):
        assert f"<th>{row}</th>" in head
    assert re.search(r"\d\.\d{3} before → \d\.\d{3} after", head)
    assert re.search(r"predicted ceiling|no fit|needs three held-out evaluations", head)
    assert page.count("<figcaption>") == len(images)  # one caption per plot


def test_a_law_against_its_sign_is_no_fit(tmp_path):
    """Accuracy that rises with entropy contradicts R = -a exp(H) + b: the report says so, no ceiling."""
    import json
    rows = [{"step": i, "rollout/entropy": h, "eval/accuracy": acc, "reward/mean": acc, "time/total_s": 10.0 * i}
            for i, (h, acc) in enumerate([(0.2, 0.1), (0.5, 0.3), (0.9, 0.6), (1.2, 0.8)])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text("name: rising\n")
    from forkrl.metrics.report import write_report
    page = write_report(tmp_path).read_text()
    assert "no fit: held-out accuracy rose with entropy" in page and "predicted ceiling" not in page
    assert not (tmp_path / "report" / "entropy_law.png").exists()
    assert "0.100 before → 0.800 after" in page and "30 s" in page


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


def test_metric_names_for_verl_and_trl_dashboards():
    from forkrl.metrics.names import rename
    m = {"reward/mean": 0.5, "reward/std": 0.1, "reward/correct": 0.4, "response_length/mean": 12.0,
         "response/clip_frac": 0.25, "policy/entropy": 1.5, "clip/low_frac": 0.01, "clip/high_frac": 0.02,
         "kl": 0.003, "lr": 1e-5, "adv/zero_std_groups_frac": 0.5, "time/sampling_s": 3.0, "eval/accuracy": 0.7,
         "entropy/p90": 2.0}
    trl = rename(m, "trl", {"correct"})
    assert trl["reward"] == 0.5 and trl["reward_std"] == 0.1 and trl["rewards/correct/mean"] == 0.4
    assert trl["completions/mean_length"] == 12.0 and trl["completions/clipped_ratio"] == 0.25
    assert trl["entropy"] == 1.5 and trl["clip_ratio/low_mean"] == 0.01 and trl["clip_ratio/region_mean"] == 0.03
    assert trl["frac_reward_zero_std"] == 0.5 and trl["learning_rate"] == 1e-5 and trl["eval_accuracy"] == 0.7
    verl = rename(m, "verl", {"correct"}, task="chain_sum")
    assert verl["critic/score/mean"] == 0.5 and verl["response_length/clip_ratio"] == 0.25
    assert verl["actor/entropy"] == 1.5 and verl["actor/pg_clipfrac"] == 0.03 and "clip/low_frac" not in verl
    assert verl["actor/kl_loss"] == 0.003 and verl["timing_s/gen"] == 3.0
    assert verl["val-core/chain_sum/accuracy"] == 0.7
    for renamed in (trl, verl):  # nothing is dropped: a metric without a counterpart keeps its name
        assert renamed["entropy/p90"] == 2.0
    assert rename(m, "forkrl") == m
