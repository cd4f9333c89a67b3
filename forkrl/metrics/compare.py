"""The results side of `forkrl compare`: per-run outcomes read from run directories, a table of
mean ± 95% interval over seeds (Markdown and CSV), and an HTML page of overlaid training curves.

A run directory is what the trainer writes: summary.json (the final evaluation) and metrics.jsonl
(one row per step). `forkrl.train.compare` runs the recipes; this module only reads what they left.
"""
from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forkrl.metrics.report import figures_html, png_bytes

# (column, where it is read from, format); "after:" keys come from the final evaluation in summary.json,
# "last:" keys from the last training step that logged them
COLUMNS = [
    ("held-out accuracy", "after:eval/accuracy", "{:.3f}"),
    ("tokens sampled", "after:budget/sampled_tokens", "{:,.0f}"),
    ("tool calls", "after:budget/tool_calls", "{:,.0f}"),
    ("wall time (s)", "run:wall_s", "{:,.0f}"),
    ("final entropy", "last:rollout/entropy", "{:.3f}"),
    ("fitted ceiling", "after:law/ceiling", "{:.3f}"),
]
CURVES = [("eval/accuracy", "Held-out accuracy"), ("reward/mean", "Training reward"),
          ("rollout/entropy", "Sampling entropy (nats)"), ("response_length/mean", "Response length (tokens)")]


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t interval; the half-width is nan for a single value."""
    from scipy import stats
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


@dataclass
class RunResult:
    recipe: str
    seed: int
    values: dict[str, float]
    curves: dict[str, tuple[list[float], list[float]]]   # metric -> (steps, values)


def read_run(run_dir: str | Path, recipe: str, seed: int) -> RunResult:
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    after = summary.get("after", {})
    meta = json.loads((run / "compare_run.json").read_text()) if (run / "compare_run.json").exists() else {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values: dict[str, float] = {}
    for k, v in after.items():  # pass@k itself, not its interval (eval/pass@k_ci)
        if k.startswith("eval/pass@") and k.rsplit("@", 1)[1].isdigit() and isinstance(v, (int, float)):
            values[f"after:{k}"] = v
    for _, key, _ in COLUMNS:
        source, name = key.split(":", 1)
        if source == "after":
            v = after.get(name)
        elif source == "run":
            v = meta.get(name)
        else:
            v = next((r[name] for r in reversed(rows) if isinstance(r.get(name), (int, float))), None)
        if isinstance(v, (int, float)):
            values[key] = float(v)
    curves = {}
    for name, _ in CURVES:
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if pts:
            curves[name] = ([p[0] for p in pts], [p[1] for p in pts])
    return RunResult(recipe, seed, values, curves)


def _columns(results: list[RunResult]) -> list[tuple[str, str, str]]:
    pass_keys = sorted({k for r in results for k in r.values if k.startswith("after:eval/pass@")},
                       key=lambda k: int(k.rsplit("@", 1)[1]))
    cols = COLUMNS[:1] + [(k.split("/", 1)[1], k, "{:.3f}") for k in pass_keys] + COLUMNS[1:]
    return [c for c in cols if any(c[1] in r.values for r in results)]


def table(results: list[RunResult]) -> tuple[str, list[dict]]:
    """(Markdown table, CSV rows): one row per recipe, each cell mean ± 95% interval over its seeds."""
    recipes = list(dict.fromkeys(r.recipe for r in results))
    cols = _columns(results)
    header = ["recipe", "seeds"] + [c[0] for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for recipe in recipes:
        runs = [r for r in results if r.recipe == recipe]
        cells, row = [recipe, str(len(runs))], {"recipe": recipe, "seeds": len(runs)}
        for label, key, fmt in cols:
            mean, half = mean_ci([r.values.get(key, math.nan) for r in runs])
            row[f"{label} mean"], row[f"{label} ci95"] = mean, half
            if math.isnan(mean):
                cells.append("–")
            else:
                cells.append(fmt.format(mean) + ("" if math.isnan(half) else " ± " + fmt.format(half)))
        lines.append("| " + " | ".join(cells) + " |")
        csv_rows.append(row)
    return "\n".join(lines) + "\n", csv_rows


def _curves_figure(results: list[RunResult], metric: str, title: str):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for recipe in dict.fromkeys(r.recipe for r in results):
        runs = [r.curves[metric] for r in results if r.recipe == recipe and metric in r.curves]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(s) for s, _ in runs)))  # the steps every seed logged
        if not steps:
            continue
        grid = np.array([[dict(zip(s, v))[x] for x in steps] for s, v in runs])
        mean = grid.mean(0)
        line, = ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, markersize=3,
                        label=f"{recipe} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, grid.min(0), grid.max(0), color=line.get_color(), alpha=0.2)
        drawn = True
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return fig if drawn else None


def write_comparison(results: list[RunResult], out_dir: str | Path, description: str = "") -> dict[str, Path]:
    """Writes compare.md, compare.csv, compare.html (+ PNGs under compare/); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, rows = table(results)
    (out / "compare.md").write_text((description + "\n\n" if description else "") + md)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    png_dir = out / "compare"
    png_dir.mkdir(exist_ok=True)
    figures = []
    for metric, title in CURVES:
        fig = _curves_figure(results, metric, title)
        if fig is None:
            continue
        data = png_bytes(fig)
        plt.close(fig)
        (png_dir / f"{metric.replace('/', '_')}.png").write_bytes(data)
        figures.append((title, data))
    head, *body = md.strip().splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    table_html = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells(head)) + "</tr>"
                  + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(line)) + "</tr>"
                            for line in body[1:]) + "</table>")
    imgs = figures_html(figures)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>forkrl compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 0.3em 0.7em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }} figure {{ margin: 0; }} img {{ max-width: 560px; }}
figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
<h1>forkrl compare</h1>
<p>{html.escape(description)}</p>
<p>Each cell: mean ± half-width of the 95% Student-t interval over seeds. Curves: mean over seeds,
shaded between the lowest and highest seed.</p>
{table_html}
<div class="grid">{imgs}</div>
</body></html>
"""
    (out / "compare.html").write_text(page)
    return {"markdown": out / "compare.md", "csv": out / "compare.csv", "html": out / "compare.html"}
