"""Methods compose: gates in recipe order (both act, or a refusal naming both), engine features,
plugins registered outside the package, moved switches, list-item overrides."""
import json

import pytest

from forkrl.config import ConfigError, build_config
from forkrl.train import Trainer
from tests.test_trainer import _cfg


def test_dars_then_dynamic_sampling_both_act_in_every_round(tmp_path):
    """The random model never answers correctly: every group is hard (accuracy 0), so DARS gives each
    min(27, n_max - n) = 4 more rollouts and then drops it (merged accuracy still 0). Dynamic sampling,
    listed after DARS, refills with fresh groups (which pass DARS again) until its 3 batches are spent."""
    cfg = _cfg(tmp_path, train={"steps": 1}, task={"rewards": [{"name": "correct"}]},
               rollout={"prompts_per_step": 2, "samples_per_prompt": 4,
                        "gates": [{"name": "dars", "n_max": 8},
                                  {"name": "dynamic_sampling", "metric": "correct", "max_gen_batches": 3}]})
    trainer = Trainer(cfg)
    trainer.train()
    m = trainer.history[0]
    assert m["dapo/gen_batches"] == 3 and m["dapo/kept_groups"] == 0
    assert m["dars/boosted_prompts"] == 3 * 2 and m["dars/extra_rollouts"] == 3 * 2 * 4
    assert m["dars/dropped_groups"] == 3 * 2
    assert m["sampler/trajectories"] == 3 * (2 * 4 + 2 * 4)  # three rounds of first samples + DARS' extra


def test_resample_on_correct_then_dars_both_act(tmp_path):
    """GRPO-RoC samples 2 x 4 per prompt and keeps 4 of each group whose rewards vary (the share of
    low token ids does); DARS then finds every kept group hard (never correct, metric correct), adds
    min(27, 8 - 4) = 4 rollouts to each and drops it."""
    cfg = _cfg(tmp_path, train={"steps": 1},
               rollout={"prompts_per_step": 2, "samples_per_prompt": 4,
                        "gates": [{"name": "resample_on_correct", "oversample": 2, "min_each": 0},
                                  {"name": "dars", "n_max": 8, "metric": "correct"}]})
    trainer = Trainer(cfg)
    trainer.train()
    m = trainer.history[0]
    assert m["roc/pool"] == 2 * 8 and m["roc/kept_groups"] == 2
    assert m["dars/extra_rollouts"] == 2 * 4 and m["dars/dropped_groups"] == 2
    assert m["sampler/trajectories"] == 2 * 8 + 2 * 4


def test_a_gate_that_must_come_last_refuses_naming_both():
    with pytest.raises(ConfigError, match=r"entropy_target must come last.*'dynamic_sampling' follows it"):
        build_config({"rollout": {"gates": ["entropy_target", "dynamic_sampling"]}})
    with pytest.raises(ConfigError, match=r"lists 'dars' twice"):
        build_config({"rollout": {"gates": ["dars", "dars"]}})
    with pytest.raises(ConfigError, match=r"rollout.gates\[0\].n_maxx is not a parameter of group gate 'dars'"):
        build_config({"rollout": {"gates": [{"name": "dars", "n_maxx": 8}]}})
    with pytest.raises(ConfigError, match=r"unknown group gate 'dapo'; allowed: \[.*'dynamic_sampling'"):
        build_config({"rollout": {"gates": ["dapo"]}})
    with pytest.raises(ConfigError, match=r"rollout.gates\[1\] \(dars\): schedule must be 'et' .* got 'fast'"):
        build_config({"rollout": {"gates": ["dynamic_sampling", {"name": "dars", "schedule": "fast"}]}})


def test_adaptive_temperature_with_an_engine_that_lacks_it_is_refused():
    # refused at config time, before any weights load; the message names both sides
    with pytest.raises(ConfigError, match=r"rollout.adaptive_temperature \(HAPO\) needs the engine feature "
                                          r"'adaptive_temperature', which rollout.engine=vllm does not support"):
        build_config({"rollout": {"engine": "vllm", "adaptive_temperature": {"enabled": True}}})
    # the torch engine has it; and building an engine checks again (for callers that skip the config)
    from forkrl.rollout import build_engine
    cfg = build_config({"rollout": {"adaptive_temperature": {"enabled": True}}})
    unchecked = cfg.rollout.model_copy(update={"engine": "vllm"})  # as a caller that skips validation would
    with pytest.raises(ValueError, match="adaptive_temperature.*rollout.engine=vllm"):
        build_engine(unchecked, None, None)


def test_a_sampler_that_needs_a_feature_names_it():
    with pytest.raises(ConfigError, match=r"rollout.sampler=april needs the engine feature 'stop_when'"):
        from forkrl.registry import ENGINES

        class NoStop:
            supports = frozenset({"exact_entropy"})
        ENGINES.register("no_stop_for_test")(NoStop)
        try:
            build_config({"rollout": {"sampler": "april", "engine": "no_stop_for_test"}})
        finally:
            ENGINES.unregister("no_stop_for_test")


PLUGIN = '''
import torch
from forkrl.registry import register_gate, register_loss


@register_loss("plugin_pg")
def plugin_pg(logp, old_logp, adv, mask, *, scale: float = 1.0):
    """-scale * A * log pi, token mean."""
    loss = -(scale * adv * logp * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"plugin/scale": scale}


@register_gate("keep_first_groups")
def keep_first_groups(groups, refill, ctx, *, k: int = 1):
    """Keep the first k groups."""
    return groups[:k], {"plugin/kept": float(len(groups[:k]))}
'''


def test_a_loss_and_a_gate_from_a_users_module_run_from_the_cli(tmp_path, monkeypatch, capsys):
    from forkrl.cli import main
    from forkrl.registry import GATES, LOSSES
    (tmp_path / "my_methods_for_test.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(20)))
    try:
        code = main(["train", "configs/quickstart.yaml", "plugins=[my_methods_for_test]", "model.name=tiny-random",
                     "train.steps=2", "task.source=file", f"task.train_path={prompts}", "task.eval_size=4",
                     "rollout.max_new_tokens=8", "rollout.prompts_per_step=3", "rollout.samples_per_prompt=2",
                     "algo.loss=plugin_pg", "algo.loss_params={scale: 0.5}", "rollout.gates=[{name: keep_first_groups, k: 2}]",
                     'task.rewards=[{name: low_ids, function: "tests.rewards:low_token_ids"}]',
                     f"output_dir={tmp_path / 'run'}", "log.tensorboard=false", "log.progress=false"])
        assert code == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
        steps = [r for r in rows if "loss" in r]
        assert len(steps) == 2
        assert all(r["plugin/scale"] == 0.5 and r["plugin/kept"] == 2.0 for r in steps)
        assert all(r["train/sequences"] == 2 * 2 for r in steps)  # 2 of the 3 groups trained
        # a plugin that cannot be imported is one line naming it
        assert main(["train", "configs/quickstart.yaml", "plugins=[no_such_module_xyz]"]) == 2
        assert "plugins: cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    finally:
        LOSSES.unregister("plugin_pg")
        GATES.unregister("keep_first_groups")


def test_moved_switches_say_where_they_went():
    with pytest.raises(ConfigError, match=r"algo.dynamic_sampling is now a registered method; write rollout.gates: "
                                          r"\[\{name: dynamic_sampling"):
        build_config({"algo": {"dynamic_sampling": {"enabled": True}}})
    with pytest.raises(ConfigError, match=r"algo.overlong .*task.reward_terms: \[\{name: overlong"):
        build_config({}, ["algo.overlong.buffer=4"])


def test_list_items_take_dotted_overrides():
    cfg = build_config({"rollout": {"gates": ["dars", {"name": "dynamic_sampling"}]}},
                       ["rollout.gates.0.n_max=16", "rollout.gates.1.max_gen_batches=2"])
    assert cfg.rollout.gates == [{"name": "dars", "n_max": 16}, {"name": "dynamic_sampling", "max_gen_batches": 2}]
    with pytest.raises(ConfigError, match=r"rollout.gates.5 needs an index below 2"):
        build_config({"rollout": {"gates": ["dars", "dynamic_sampling"]}}, ["rollout.gates.5.n_max=1"])
