"""Every recipe in configs/ runs end to end on the tiny model (3 steps, small batches)."""
import glob
import json

import pytest

from forkrl.config import load_config
from forkrl.train import Trainer

RECIPES = sorted(glob.glob("configs/*.yaml"))

# a metric only the recipe's method writes: proof that the method, not a default, ran
METHOD_METRIC = {
    "hapo": "hapo/eps_hi_mean", "steer": "steer/weight_mean", "bapo": "bapo/c_lo", "aepo_loss": "aepo/kept_clipped_frac",
    "epo": "epo/phase_weight", "empg": "adv/empg_g_max", "d3s": "train/selected_sample_frac",
    "dart": "rollout_corr/is_mean", "spear": "replay/buffer_size", "fapo": "reward/flawed_positive",
    "clip_cov": "cov/candidates", "kl_cov": "ppo_kl_abs", "forking_tokens": "train/selected_token_frac",
    "entropy_target": "policy/entropy", "tools_quickstart": "tools/use_frac", "tools_search": "tools/use_frac",
    "grpo_roc": "roc/pool", "sft_tools": "sft/nll", "arpo": "sampler/arpo/branches", "latr": "sampler/latr/eta",
    "april": "sampler/april/returned_groups", "dars": "dars/extra_rollouts", "brorl": "sampler/broad/prefill_shared_tokens",
    "etmr": "sampler/etmr/leaves", "aepo": "sampler/aepo/global_per_prompt",
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.split("/")[-1])
def test_recipe_runs_three_steps_on_tiny_random(path, tmp_path):
    extra = []
    if load_config(path).sft.train_path:  # an SFT recipe: its demonstrations, generated as the README says
        from forkrl.tasks.demos import main as make_demos
        make_demos([path, str(tmp_path / "demos.jsonl"), "--n", "24"])
        extra = [f"sft.train_path={tmp_path / 'demos.jsonl'}", "sft.epochs=null", "sft.batch_size=8"]
    cfg = load_config(path, [*extra,
        "model.name=tiny-random", f"output_dir={tmp_path}", "train.steps=3", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8", "task.train_size=20", "task.eval_size=4",
        "eval.at_start=false", "eval.every=0", "algo.dynamic_sampling.max_gen_batches=2", "log.progress=false",
        "log.tensorboard=false", "algo.overlong.buffer=4",
        # a reward the random model's samples differ on, so groups have variance and every step trains
        'task.rewards=[{name: low_ids, function: "tests.rewards:low_token_ids"}]', "algo.dynamic_sampling.metric=reward",
        "rollout.dars.metric=reward"])
    summary = Trainer(cfg).train()
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    name = path.split("/")[-1].removesuffix(".yaml")
    if name in METHOD_METRIC:
        assert any(METHOD_METRIC[name] in r for r in rows), f"{name}: no {METHOD_METRIC[name]} in the metrics"


def test_readme_loss_example_registers_and_trains(tmp_path):
    """The README's "Writing a method" snippet, run as written: it registers, validates and trains."""
    import re

    from forkrl.algos import LOSSES
    text = open("README.md").read()
    block = re.search(r"### Writing a method.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    exec(compile(block, "README.md", "exec"), {})
    try:
        cfg = load_config("configs/quickstart.yaml", [
            "model.name=tiny-random", f"output_dir={tmp_path}", "train.steps=1", "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8", "task.train_size=20", "task.eval_size=4",
            "eval.at_start=false", "log.progress=false", "log.tensorboard=false",
            'task.rewards=[{name: low_ids, function: "tests.rewards:low_token_ids"}]',
            "algo.loss=entropy_scaled_pg", "algo.loss_params={beta: 0.2}"])
        trainer = Trainer(cfg)
        trainer.train()
        assert "my/mean_entropy" in trainer.history[0]
    finally:
        del LOSSES["entropy_scaled_pg"]
