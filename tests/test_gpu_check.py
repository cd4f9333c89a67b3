"""`bench/gpu_check.py --device cpu --tiny` runs every part of the GPU check (the runner against the
Hugging Face forward for Llama, Qwen2 and Qwen3; every sampler; the engine beside Hugging Face
generate and generate_batch, the learner's update, three GRPO steps, `forkrl train --nproc 1` under
torchrun) on a tiny model, so the script a GPU session runs cannot rot between sessions."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    archs = result["architectures"]
    assert archs["ok"] and all(archs[k]["max_abs_logprob_diff"] < 1e-4 for k in ("llama", "qwen2", "qwen3"))
    samplers = result["samplers"]
    assert samplers["ok"] and all(samplers[k]["trajectories"] == 16 for k in ("independent", "latr", "etmr", "arpo"))
    assert samplers["etmr"]["branch_points"] > 0
    engine = result["engine"]
    for batch in ("batch_4", "batch_8"):
        row = engine[batch]
        assert row["forkrl_tokens_per_s"] > 0 and row["hf_generate_tokens_per_s"] > 0
    assert engine["batch_4"]["hf_generate_batch_tokens_per_s"] > 0
    assert engine["graph_vs_eager_greedy_token_agreement"] == 1.0
    learner = result["learner"]
    assert learner["loss_finite"] and learner["tokens_per_s"] > 0 and learner["packed_tokens_per_update"] > 0
    steps = result["grpo"]["steps"]
    assert len(steps) == 3 and all(s["sampled_tokens"] == 2 * 4 * 16 and s["learning_s"] > 0 for s in steps)
    assert result["torchrun"]["ok"], result["torchrun"]
    assert result["torchrun"]["summary"]["steps"] == 1
