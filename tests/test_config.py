import pytest

from forkrl.config import ConfigError, build_config, load_config


def test_unknown_key_names_the_field_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'; allowed here: .*\blr\b"):
        build_config({}, ["train.learning_rate=1e-5"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"algo.agg: got 'mean'; allowed: .*token-mean"):
        build_config({"algo": {"agg": "mean"}})


def test_unknown_registered_method_lists_registry():
    with pytest.raises(ConfigError, match=r"algo.loss: unknown policy loss 'ppo'; allowed: \[.*'ppo_clip'"):
        build_config({}, ["algo.loss=ppo"])
    with pytest.raises(ConfigError, match=r"algo.loss_params.eps is not a parameter of 'ppo_clip'; allowed: \['clip_low'"):
        build_config({}, ["algo.loss_params={eps: 0.2}"])


def test_overrides_parse_yaml_values_and_keep_text():
    cfg = build_config({}, ["train.lr=3e-6", "rollout.stop=['</answer>']", "task.system_prompt=Reply: the number.",
                            "algo.loss_params={clip_high: 0.28}"])
    assert cfg.train.lr == 3e-6 and cfg.rollout.stop == ["</answer>"]
    assert cfg.task.system_prompt == "Reply: the number." and cfg.algo.loss_params == {"clip_high": 0.28}
    with pytest.raises(ConfigError, match="must look like key=value"):
        build_config({}, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train.steps: Input should be greater than 0"):
        build_config({}, ["train.steps=0"])


def test_every_recipe_loads():
    import glob
    paths = sorted(glob.glob("configs/*.yaml"))
    assert {"configs/quickstart.yaml", "configs/grpo.yaml", "configs/dapo.yaml", "configs/drgrpo.yaml",
            "configs/gspo.yaml"} <= set(paths)
    for path in paths:
        cfg = load_config(path)
        assert cfg.paper, f"{path} names no paper"
