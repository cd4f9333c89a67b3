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
    "arpo_long": "sampler/arpo/branches", "latr_long": "sampler/latr/eta",
    "april": "sampler/april/returned_groups", "dars": "dars/extra_rollouts", "brorl": "sampler/broad/prefill_shared_tokens",
    "etmr": "sampler/etmr/leaves", "branchgrpo": "sampler/branchgrpo/tree_members",
    "branchgrpo_long": "sampler/branchgrpo/tree_members", "branchgrpo_tools_long": "sampler/branchgrpo/tree_members", "aepo": "sampler/aepo/global_per_prompt",
    "agent_single_call": "sampler/episodes", "agent_two_step": "sampler/episodes", "ppo": "critic/vf_explained_var",
    "router_r1": "reward/router_cost", "mle_milestones": "reward/milestones_reached", "uis1": "uis1/matched_frac",
    "marft": "marft/team_reward", "router_r1_cost": "reward/router_cost",
}


def _small_methods(cfg) -> list[str]:
    """Overrides that size a recipe's gates and reward terms for 8-token completions of a random model."""
    out = []
    for i, gate in enumerate(cfg.rollout.gates):
        if gate["name"] == "dynamic_sampling":
            out += [f"rollout.gates.{i}.max_gen_batches=2", f"rollout.gates.{i}.metric=reward"]
        elif gate["name"] == "dars":
            out.append(f"rollout.gates.{i}.metric=reward")
    for i, term in enumerate(cfg.task.reward_terms):
        if term["name"] == "overlong":
            out.append(f"task.reward_terms.{i}.buffer=4")
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.split("/")[-1])
def test_recipe_runs_three_steps_on_tiny_random(path, tmp_path):
    extra = []
    if load_config(path).sft.train_path:  # an SFT recipe: its demonstrations, generated as the README says
        from forkrl.tasks.demos import main as make_demos
        make_demos([path, str(tmp_path / "demos.jsonl"), "--n", "24"])
        extra = [f"sft.train_path={tmp_path / 'demos.jsonl'}", "sft.epochs=null", "sft.batch_size=8"]
    cfg = load_config(path, [*extra, *_small_methods(load_config(path)),
        "model.name=tiny-random", f"output_dir={tmp_path}", "train.steps=3", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8", "task.train_size=20", "task.eval_size=4",
        "eval.at_start=false", "eval.every=0", "log.progress=false", "log.tensorboard=false",
        # a reward the random model's samples differ on, so groups have variance and every step trains
        'task.rewards=[{name: low_ids, function: "tests.rewards:low_token_ids"}]'])
    summary = Trainer(cfg).train()
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    name = path.split("/")[-1].removesuffix(".yaml")
    if name in METHOD_METRIC:
        assert any(METHOD_METRIC[name] in r for r in rows), f"{name}: no {METHOD_METRIC[name]} in the metrics"


def test_readme_writing_a_method_files_register_and_train(tmp_path, monkeypatch):
    """The README's "Writing a method" files, written out as a package and run as written through
    `plugins`: a loss, a gate, a reward term and a sampler in one recipe, a tool in another."""
    import re

    from forkrl.registry import GATES, LOSSES, REWARD_TERMS, SAMPLERS, TOOLS
    text = open("README.md").read()
    section = re.search(r"### Writing a method(.*?)\n### ", text, re.DOTALL).group(1)
    files = re.findall(r"```python\n# (my_methods/\w+\.py)\n(.*?)```", section, re.DOTALL)
    assert [f for f, _ in files] == ["my_methods/loss.py", "my_methods/gate.py", "my_methods/reward_term.py",
                                     "my_methods/sampler.py", "my_methods/tool.py"]
    package = tmp_path / "my_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, body in files:
        (tmp_path / name).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    small = ["model.name=tiny-random", "train.steps=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
             "rollout.max_new_tokens=8", "task.train_size=20", "task.eval_size=4", "eval.at_start=false",
             "log.progress=false", "log.tensorboard=false",
             'task.rewards=[{name: low_ids, function: "tests.rewards:low_token_ids"}]']
    try:
        cfg = load_config("configs/quickstart.yaml", [
            *small, f"output_dir={tmp_path / 'a'}",
            "plugins=[my_methods.loss, my_methods.gate, my_methods.reward_term, my_methods.sampler]",
            "algo.loss=entropy_scaled_pg", "algo.loss_params={beta: 0.2}",
            "rollout.gates=[{name: drop_truncated_groups, max_truncated: 1.0}]",
            "task.reward_terms=[{name: brevity, coef: 0.05}]", "rollout.sampler=two_temperatures"])
        trainer = Trainer(cfg)
        trainer.train()
        m = trainer.history[0]
        assert {"my/mean_entropy", "my/dropped_groups", "reward/brevity", "sampler/two_temperatures/hot"} <= set(m)
        assert m["reward/brevity"] == pytest.approx(-0.05)  # every completion uses all 8 tokens
        assert m["train/sequences"] == 2 * 4
        cfg = load_config("configs/tools_quickstart.yaml", [
            *small, f"output_dir={tmp_path / 'b'}", "plugins=[my_methods.tool]", "env.tools=[python, reverse]"])
        trainer = Trainer(cfg)
        assert trainer.env.tools["reverse"]("abc ").text == "cba"
        trainer.train()
        assert trainer.step_idx == 2
    finally:
        LOSSES.unregister("entropy_scaled_pg")
        GATES.unregister("drop_truncated_groups")
        REWARD_TERMS.unregister("brevity")
        SAMPLERS.unregister("two_temperatures")
        TOOLS.unregister("reverse")
