"""`forkrl report`: a self-contained HTML page and PNGs from a real (tiny) run."""
import re
from html.parser import HTMLParser

from forkrl.cli import main
from forkrl.train import Trainer
from tests.test_trainer import _cfg


def test_report_from_a_tiny_run(tmp_path, capsys):
    cfg = _cfg(tmp_path, train={"steps": 4}, eval={"at_start": True, "every": 1, "size": 4})
    Trainer(cfg).train()
    assert main(["report", cfg.output_dir]) == 0
    path = capsys.readouterr().out.strip()
    page = open(path).read()
    HTMLParser().feed(page)  # well-formed enough to parse
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 5 and all(len(i) > 1000 for i in images)        # embedded, not linked
    pngs = sorted(p.name for p in (tmp_path / "run" / "report").glob("*.png"))
    assert {"reward.png", "entropy.png", "clipping.png", "length.png"} <= set(pngs)
    assert page.count('title="H = ') > 10                                 # tokens shaded by entropy
    assert "Fitted law" in page or "needs three held-out evaluations" in page
