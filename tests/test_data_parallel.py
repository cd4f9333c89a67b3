"""`forkrl train --nproc N`: N ranks compute the update one process computes over the same batch
(FSDP2 on CPU with gloo, under torchrun), whichever rank holds which group."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "results.json"
    run = torchrun("tests/dp_worker.py", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


METHODS = ["grpo_ppo_clip", "gspo", "clip_cov", "kl_cov", "forking_tokens", "dapo", "grpo_kl", "two_mini_batches"]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_update_as_one_process(equivalence, method):
    """Parameters within 1e-6 (float32) of the single-process update, with uneven tokens per rank and
    every placement of the groups; the update itself is far larger than that. Two mini-batches: the
    second gradient is taken where the first step's rounding left the weights, which one process with
    another micro-batch split also changes by ~2e-6 on this model: the bound there is 1e-5."""
    runs = {k: v for k, v in equivalence.items() if k.startswith(method + " / ")}
    assert len(runs) == 3
    bound = 1e-5 if method == "two_mini_batches" else 1e-6
    for where, r in runs.items():
        assert r["update_size"] > 1e-2, where
        assert r["max_param_diff"] < bound, (where, r["max_param_diff"])
        assert len(set(r["tokens_per_rank"])) == 2  # uneven token counts per rank


@pytest.mark.parametrize("method", METHODS)
def test_placement_changes_no_statistic(equivalence, method):
    """The step's metrics (losses, clip fractions, covariances, selected-token shares, entropy probe)
    are the single process's, whichever rank holds which group."""
    runs = [v for k, v in equivalence.items() if k.startswith(method + " / ")]
    reference = runs[0]["reference_metrics"]
    for r in runs:
        m = r["metrics"]
        assert set(m) == set(reference)
        for k, v in reference.items():
            if k.startswith("entropy/delta") or method == "two_mini_batches":
                # measured after the update: the weights' last-bit differences show at 1e-5
                assert m[k] == pytest.approx(v, rel=1e-4, abs=2e-5), k
            else:
                assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
