"""`forkrl report RUN_DIR`: one self-contained HTML page (plots embedded) from a run's logs.

Reads metrics.jsonl and samples.jsonl, draws the curves with matplotlib (also saved as PNG under
RUN_DIR/report/), fits the entropy–reward law on the held-out points, and shows sampled completions
with every token shaded by its entropy so the forking tokens stand out.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from forkrl.metrics.entropy import fit_entropy_law

PANELS = [  # (file name, title, [(metric, label)])
    ("reward", "Reward and accuracy", [("reward/mean", "reward"), ("accuracy", "training accuracy"),
                                        ("eval/accuracy", "held-out accuracy")]),
    ("entropy", "Policy entropy (nats)", [("rollout/entropy", "at sampling"), ("policy/entropy", "training forward"),
                                          ("entropy/p90", "90th percentile")]),
    ("entropy_change", "Entropy change per update: measured vs first-order Cov(log π, Δz)",
     [("entropy/delta_measured", "measured"), ("entropy/delta_predicted", "first-order prediction")]),
    ("entropy_after_tool", "Entropy after tool results", [("entropy/after_tool", "first tokens after a result"),
                                                          ("entropy/elsewhere", "elsewhere")]),
    ("covariance", "Cov(log π, A) over trained tokens", [("entropy/cov_logp_adv", "covariance")]),
    ("clipping", "Clipped tokens", [("clip/low_frac", "low bound"), ("clip/high_frac", "high bound"),
                                    ("clip/dual_frac", "dual clip")]),
    ("kl", "KL", [("kl", "to reference"), ("ppo_kl", "to old policy")]),
    ("mismatch", "Sampler vs learner: mean exp(|Δ log p|) over trained tokens (1 = identical)",
     [("train/logprob_mismatch", "mean"), ("train/logprob_mismatch_frac_above_2", "share of tokens above 2")]),
    ("length", "Response length (tokens)", [("response_length/mean", "mean"), ("response_length/max", "max")]),
    ("tools", "Tool use", [("tools/use_frac", "share calling a tool"), ("tools/calls_per_traj", "calls per trajectory"),
                           ("tools/error_rate", "error rate")]),
]


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def figures_html(figures: list[tuple[str, bytes]]) -> str:
    """(caption, PNG bytes) pairs as <figure> elements with the images embedded."""
    return "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
                   f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, d in figures)


def _law_figure(rows, plt):
    """Held-out accuracy against sampling entropy, with the fitted law and its ceiling."""
    pts = [(r["rollout/entropy"], r["eval/accuracy"]) for r in rows
           if isinstance(r.get("rollout/entropy"), (int, float)) and isinstance(r.get("eval/accuracy"), (int, float))]
    if len(pts) < 3 or len({round(h, 9) for h, _ in pts}) < 3:
        return None, None
    law = fit_entropy_law([h for h, _ in pts], [a for _, a in pts])
    if law.a <= 0:  # accuracy rising with entropy contradicts R = -a exp(H) + b: no ceiling to read off
        return None, law
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter([h for h, _ in pts], [a for _, a in pts], label="evaluations")
    grid = np.linspace(0, max(h for h, _ in pts) * 1.05, 100)
    ax.plot(grid, -law.a * np.exp(grid) + law.b, label=f"R = {-law.a:+.3g}·exp(H) {law.b:+.3g}")
    ax.axhline(law.ceiling, linestyle="--", color="gray", label=f"ceiling {law.ceiling:.3f} ± {law.ceiling_se:.3f}")
    ax.set_xlabel("entropy (nats)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    return fig, law


def _shade(tokens: list[str], entropy: list, mask: list[int], top: float) -> str:
    spans = []
    for tok, e, m in zip(tokens, entropy, mask):
        text = html.escape(tok).replace("\n", "↵<br>")
        if not m or e is None:
            spans.append(f'<span class="obs">{text}</span>')
            continue
        alpha = min(e / top, 1.0) if top > 0 else 0.0
        spans.append(f'<span style="background: rgba(230, 80, 20, {alpha:.2f})" title="H = {e:.3f}">{text}</span>')
    return "".join(spans)


def _summary_table(run: Path, rows: list[dict], law_text: str) -> str:
    """The run in a few lines: recipe, model, task, steps, held-out before/after, wall time, final
    entropy and the fitted ceiling (from config.yaml, summary.json and metrics.jsonl)."""
    import yaml
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    done = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    before = done.get("before", {}).get("eval/accuracy", evals[0]["eval/accuracy"] if evals and evals[0]["step"] == 0
                                        else None)
    after = done.get("after", {}).get("eval/accuracy", evals[-1]["eval/accuracy"] if evals else None)
    steps = [r for r in rows if "reward/mean" in r]
    wall = next((r["time/total_s"] for r in reversed(rows) if isinstance(r.get("time/total_s"), (int, float))), None)
    entropy = next((r["rollout/entropy"] for r in reversed(rows) if isinstance(r.get("rollout/entropy"), (int, float))),
                   None)
    task = cfg.get("task", {})
    algo = cfg.get("algo", {})
    fmt = (lambda v, spec=".3f": "–" if v is None else format(v, spec))
    lines = [
        ("recipe", f"{cfg.get('name', run.name)}" + (f" ({cfg['paper']})" if cfg.get("paper") else "")),
        ("method", f"advantage {algo.get('advantage', '?')}, loss {algo.get('loss', '?')}, aggregation "
                   f"{algo.get('agg', '?')}"),
        ("model", str(cfg.get("model", {}).get("name", "?"))),
        ("task", f"{task.get('source', '?')}: {task.get('dataset') or task.get('train_path') or '?'}"),
        ("steps", f"{steps[-1]['step'] if steps else 0}" + ("" if done else " (not finished)")),
        ("held-out accuracy", f"{fmt(before)} before → {fmt(after)} after"),
        ("wall time", "–" if wall is None else f"{wall:.0f} s"),
        ("final sampling entropy", f"{fmt(entropy)} nats"),
        ("entropy–reward law", law_text),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in lines)
    return f'<table class="summary">{cells}</table>'


def write_report(run_dir: str | Path, samples_per_step: int = 1, max_steps_shown: int = 6) -> Path:
    """Writes RUN_DIR/report.html and RUN_DIR/report/*.png; returns the HTML path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    rows = _read(run / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run}/metrics.jsonl is missing or empty: not a forkrl run directory?")
    png_dir = run / "report"
    png_dir.mkdir(exist_ok=True)
    figures = []
    from matplotlib.ticker import MaxNLocator
    for name, title, keys in PANELS:
        present = [(k, label) for k, label in keys if _series(rows, k)[0]]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        # series that coincide (reward = accuracy under a 0/1 reward) stay apart: own line style and marker
        for (k, label), style, marker, width in zip(present, ("-", "--", ":"), ("o", "s", "^"), (2.6, 1.6, 1.2)):
            x, y = _series(rows, k)
            ax.plot(x, y, linestyle=style, linewidth=width, marker=marker if len(x) < 30 else None, markersize=4,
                    markerfacecolor="none", label=label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figures.append((name, title, png_bytes(fig)))
        plt.close(fig)
    fig, law = _law_figure(rows, plt)
    if fig is not None:
        figures.append(("entropy_law", "Entropy–reward law: held-out accuracy against sampling entropy",
                        png_bytes(fig)))
        plt.close(fig)
    for name, _, data in figures:
        (png_dir / f"{name}.png").write_bytes(data)

    samples = _read(run / "samples.jsonl")
    steps = sorted({s["step"] for s in samples})
    shown = steps if len(steps) <= max_steps_shown else [steps[round(i * (len(steps) - 1) / (max_steps_shown - 1))]
                                                          for i in range(max_steps_shown)]
    top = max((e for s in samples for e, m in zip(s["entropy"], s["mask"]) if m and e is not None), default=1.0)
    sample_html = []
    for step in shown:
        for s in [x for x in samples if x["step"] == step][:samples_per_step]:
            sample_html.append(
                f'<div class="sample"><div class="meta">step {step} · reward {s["reward"]:.3g} · '
                f'{"correct" if s.get("correct") else "wrong"} · {html.escape(s.get("prompt", "")[:160])}</div>'
                f'<div class="tokens">{_shade(s["tokens"], s["entropy"], s["mask"], top)}</div></div>')
    if law is None:
        law_text = "needs three held-out evaluations at different entropies (set eval.every)"
    elif law.a <= 0:
        law_text = (f"no fit: held-out accuracy rose with entropy (a = {law.a:.3g} over {law.n} evaluations), "
                    "against R = −a·exp(H) + b with a > 0")
    else:
        law_text = (f"R = {-law.a:+.3g}·exp(H) {law.b:+.3g}; predicted ceiling at H = 0: {law.ceiling:.3f} ± "
                    f"{law.ceiling_se:.3f} ({law.n} evaluations)")
    summary_html = _summary_table(run, rows, law_text)
    imgs = figures_html([(t, d) for _, t, d in figures])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>forkrl report: {html.escape(run.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }} figure {{ margin: 0; }} img {{ max-width: 560px; }}
figcaption {{ font-size: 0.85em; color: #555; }}
table.summary {{ border-collapse: collapse; margin-bottom: 1.5em; }}
table.summary th {{ text-align: left; padding: 0.2em 1.2em 0.2em 0; color: #555; font-weight: normal; }}
.sample {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin: 0.8em 0; }}
.meta {{ font-size: 0.8em; color: #666; margin-bottom: 0.4em; }}
.tokens {{ font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.7; }}
.obs {{ color: #1a5fb4; background: #eef4ff; }}
</style></head><body>
<h1>forkrl report: {html.escape(run.name)}</h1>
{summary_html}
<div class="grid">{imgs}</div>
<h2>Sampled completions</h2>
<p>Each generated token is shaded by its entropy at sampling time (darker = more uncertain; hover for
the value). Blue text is tool output, which the policy did not write.</p>
{"".join(sample_html) or "<p>No samples logged.</p>"}
</body></html>
"""
    out = run / "report.html"
    out.write_text(page)
    return out
