"""What the python tool's isolation costs: the latency of one trivial call and the calls per second of
64 concurrent ones (the sandbox's default 4 workers), for each isolation level this machine offers
and for the sandbox as it was at a baseline commit (loaded from git). Prints JSON.

    python bench/sandbox.py [--baseline c12b898] [--repeats 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_baseline(rev: str):
    """The sandbox module as it was at `rev` (its isolation `auto` picked what it picked then)."""
    text = subprocess.run(["git", "show", f"{rev}:forkrl/envs/sandbox.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "baseline_sandbox.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return module


def measure(sandbox, repeats: int) -> dict:
    assert sandbox.run("print(6 * 7)").text == "42"          # warm-up, and a check that it works
    latency = []
    for _ in range(repeats * 12):
        start = time.perf_counter()
        sandbox.run("print(1)")
        latency.append(time.perf_counter() - start)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = sandbox.run_many([f"print({i})" for i in range(64)])
        rates.append(64 / (time.perf_counter() - start))
        assert [r.text for r in results] == [str(i) for i in range(64)]
    return {"latency_ms": round(1000 * statistics.median(latency), 1), "calls_per_s_64_concurrent":
            round(statistics.median(rates), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="c12b898", help="git revision of the sandbox to compare with")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from forkrl.envs.sandbox import PythonSandbox, bwrap_available, cgroups_available
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "cgroups": cgroups_available(), "levels": {}}
    baseline = load_baseline(args.baseline)
    old = baseline.PythonSandbox(isolation="auto")
    result["levels"][f"baseline {args.baseline} ({old.isolation})"] = measure(old, args.repeats)
    old.close()
    levels = (["bwrap"] if bwrap_available() else []) + ["process"]
    for level in levels:
        sb = PythonSandbox(isolation=level)
        result["levels"][level] = measure(sb, args.repeats)
        sb.close()
    base = next(iter(result["levels"].values()))
    for name, m in result["levels"].items():
        m["latency_vs_baseline"] = round(m["latency_ms"] / base["latency_ms"], 2)
        m["throughput_vs_baseline"] = round(m["calls_per_s_64_concurrent"] / base["calls_per_s_64_concurrent"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
