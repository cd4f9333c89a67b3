import pytest

from forkrl.config import ConfigError, build_config, load_config


def test_unknown_key_names_the_field_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.steps_total': did you mean train.steps\? "
                                          r"\(allowed here: .*\blr\b"):
        build_config({}, ["train.steps_total=3"])


@pytest.mark.parametrize("override, hint", [
    ("train.learning_rate=1e-5", "TRL's learning_rate is forkrl's train.lr"),
    ("num_generations=4", "TRL's num_generations is forkrl's rollout.samples_per_prompt"),
    ("algo.beta=0.04", "TRL's beta is forkrl's algo.kl_coef"),
    ("algo.epsilon=0.2", "TRL's epsilon is forkrl's algo.loss_params.clip_low"),
    ("algo.loss_type=dapo", "forkrl's algo.agg \(dapo/bnpo -> token-mean"),
    ("train.ppo_mini_batch_size=4", "verl's ppo_mini_batch_size is forkrl's train.mini_batches, a count"),
    ("train.temperature=0.7", "did you mean rollout.temperature\?"),
    ("rollout.sample_per_prompt=4", "did you mean rollout.samples_per_prompt\?"),
])
def test_unknown_keys_suggest_forkrls_name(override, hint):
    """TRL's and verl's names, and near misses in any section, point at forkrl's key, in one line."""
    with pytest.raises(ConfigError, match=hint) as e:
        build_config({}, [override])
    assert "\n" not in str(e.value)


def test_one_sample_per_prompt_with_a_group_advantage_is_refused():
    with pytest.raises(ConfigError, match="samples_per_prompt=1: algo.advantage='grpo' compares"):
        build_config({}, ["rollout.samples_per_prompt=1"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"algo.agg: got 'mean'; allowed: .*token-mean"):
        build_config({"algo": {"agg": "mean"}})


def test_unknown_registered_method_lists_registry():
    with pytest.raises(ConfigError, match=r"algo.loss: unknown policy loss 'ppo'; allowed: \[.*'ppo_clip'"):
        build_config({}, ["algo.loss=ppo"])
    with pytest.raises(ConfigError, match=r"algo.loss_params.eps is not a parameter of 'ppo_clip'; allowed: \['clip_low'"):
        build_config({}, ["algo.loss_params={eps: 0.2}"])


def test_a_method_hyperparameter_outside_its_choices_fails_at_load():
    """Choices a method annotates as Literal are checked with the config, before any weights load."""
    with pytest.raises(ConfigError, match=r"algo.advantage_params.fusion must be one of \['mean', 'probability'\], got 'max'"):
        build_config({}, ["algo.advantage=branch_depth", "algo.advantage_params={fusion: max}"])
    with pytest.raises(ConfigError, match=r"algo.token_selector_params.width_pruning_mode must be one of \[0, 1, 2\]"):
        build_config({}, ["algo.token_selector=branch_pruning", "algo.token_selector_params={width_pruning_mode: 3}"])
    cfg = build_config({}, ["algo.advantage=uis1", "algo.advantage_params={normalization: mean_norm}"])
    assert cfg.algo.advantage_params == {"normalization": "mean_norm"}


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
