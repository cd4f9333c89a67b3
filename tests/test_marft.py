"""MARFT's action-level pieces (algorithms.md §19) on hand-computed numbers: the action log-prob and
its normalisations, and MARFT-A's clipped action-level ratio. Its flattened GAE across agents is
tested in tests/test_critic.py."""
import math
import re

import pytest
import torch

from forkrl.algos.marft import action_logprob, action_ppo


def test_action_logprob_normalisations():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert action_logprob(logp, mask).tolist() == [-6.0, -1.0]                       # sum (default)
    assert action_logprob(logp, mask, mode="token").tolist() == [-2.0, -0.5]         # / tokens
    assert action_logprob(logp, mask, mode="word", words=torch.tensor([2, 4])).tolist() == [-3.0, -0.25]
    with pytest.raises(ValueError, match="word count"):
        action_logprob(logp, mask, mode="word")


def test_action_level_ratio_is_clipped_per_action():
    """Row 0: log-ratio of the action = (-1+1.1) + (-1+1.1) = 0.2 -> r = e^0.2 = 1.2214 > 1.2, A = +1:
    min(1.2214, 1.2) = 1.2. Row 1: log-ratio -0.1 -> r = 0.9048, A = -2: min(-1.8097, -1.8097) (inside
    the clip) -> -1.8097. L = -(1.2 - 1.8097) / 2 = 0.30484."""
    logp = torch.tensor([[-1.0, -1.0], [-0.6, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.1], [-0.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = action_ppo(logp, old, adv, mask, clip=0.2)
    assert float(loss.detach()) == pytest.approx(-(1.2 - 2 * math.exp(-0.1)) / 2, abs=1e-6)
    assert m["marft/clip_frac"] == 0.5
    loss.backward()
    # row 0 is clipped (no gradient); row 1: d/dlogp of -(r * A)/2 = -(A r)/2 = 0.9048 on its one token
    assert logp.grad[0].tolist() == [0.0, 0.0]
    assert logp.grad[1].tolist() == pytest.approx([math.exp(-0.1), 0.0], abs=1e-6)


# -- MARFT's credit over an episode's agents (algorithms.md §19) -------------------------------------

def test_episode_gae_chains_an_episodes_rows_in_step_order():
    """The hand-computed flattened sequence of test_critic (two steps x two agents, gamma 0.5, lam 1):
    here each action is its own row, one value at its first token, the rows shuffled; the chain
    follows the step index, not the row order. A row outside any episode (id -1) is alone."""
    from forkrl.algos.values import episode_gae
    # rows: (t1,a2) (t0,a1) (t1,a1) (t0,a2), then a lone row with reward 1 and value 0.25
    index = [3, 0, 2, 1]
    values = [0.3, 0.2, 0.1, 0.4]
    rewards = [0.5, 0.0, 0.0, 1.0]
    V = torch.zeros(5, 2)
    R = torch.zeros(5, 2)
    mask = torch.zeros(5, 2)
    for b in range(4):
        V[b, 0], R[b, 0], mask[b, 0] = values[b], rewards[b], 1
    V[4, 0], R[4, 0], mask[4, 0] = 0.25, 1.0, 1
    episodes = torch.tensor([[0, i, 1] for i in index] + [[-1, 0, 1]])
    adv, ret = episode_gae(R, V, mask, episodes, gamma=0.5, lam=1.0)
    assert adv[:4, 0].tolist() == pytest.approx([0.2, 0.3625, 0.15, 0.725], abs=1e-6)
    assert adv[4, 0] == pytest.approx(0.75)
    assert ret[:, 1].tolist() == [0.0] * 5


def test_episode_gae_chains_tokens_across_agents_marft_t():
    """MARFT-T: per-token values inside each agent's response, the chain running from the reasoner's
    last token to the actor's first. Reasoner tokens V = (0.1, 0.2), actor tokens V = (0.4, 0.6),
    outcome 1 on the actor's last token; gamma 0.5, lam 0.5 (gamma*lam = 0.25):
      actor t1:    d = 1 - 0.6 = 0.4                         A = 0.4
      actor t0:    d = 0.5*0.6 - 0.4 = -0.1                  A = -0.1 + 0.25*0.4 = 0
      reasoner t1: d = 0.5*0.4 - 0.2 = 0 (its reward is 0)   A = 0 + 0.25*0 = 0
      reasoner t0: d = 0.5*0.2 - 0.1 = 0                     A = 0"""
    from forkrl.algos.values import episode_gae
    V = torch.tensor([[0.1, 0.2, 0.0], [0.4, 0.6, 0.0]])
    R = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv, ret = episode_gae(R, V, mask, torch.tensor([[7, 0, 1], [7, 1, 1]]), gamma=0.5, lam=0.5)
    assert adv.flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.4, 0.0], abs=1e-6)
    assert ret.flatten().tolist() == pytest.approx([0.1, 0.2, 0.0, 0.4, 1.0, 0.0], abs=1e-6)
    # each row alone (no episodes): the reasoner's chain ends at its own last token, with reward 0
    alone, _ = episode_gae(R, V, mask, None, gamma=0.5, lam=0.5)
    assert alone[0, 1] == pytest.approx(-0.2)


def test_action_level_advantage_is_whitened_over_actions_and_covers_the_response():
    """One critic position per row (its first token): A = R - V there, = (1, -1, 0) raw; whitened over
    the three actions (mean 0, Bessel std 1) it stays (1, -1, 0); every generated token of a row then
    carries its row's advantage, and padding stays 0."""
    from forkrl.algos.values import first_token_mask, gae_advantage
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    vm = first_token_mask(mask)
    assert vm.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    values = torch.tensor([[0.5, 0, 0], [0, 1.5, 0], [0.2, 0, 0]])
    returns = torch.tensor([[1.5, 0, 0], [0, 0.5, 0], [0.2, 0, 0]])
    adv, m = gae_advantage(torch.zeros(3), torch.zeros(3), mask, values=values, returns=returns, value_mask=vm)
    assert adv.flatten().tolist() == pytest.approx([1, 1, 1, 0, -1, -1, 0, 0, 0], abs=1e-6)
    assert m["adv/raw_mean"] == pytest.approx(0.0)


def test_action_ppo_normalised_by_words():
    """normalization 'word': log-ratio of row 0 = (0.1 + 0.1) / 4 words = 0.05 -> r = e^0.05, inside the
    clip, A = 1: L = -e^0.05 (one row)."""
    logp = torch.tensor([[-1.0, -1.0]])
    old = torch.tensor([[-1.1, -1.1]])
    loss, _ = action_ppo(logp, old, torch.ones(1, 2), torch.ones(1, 2), normalization="word",
                         words=torch.tensor([4.0]))
    assert float(loss.detach()) == pytest.approx(-math.exp(0.05), abs=1e-6)


def test_agent_by_agent_trains_one_agent_per_interval():
    from forkrl.algos.marft import agent_by_agent
    adapter = torch.tensor([0, 1, 0, 1])
    turns = [agent_by_agent(torch.zeros(4), torch.zeros(4), adapter=adapter, step=s, interval=2).tolist()
             for s in (1, 2, 3, 4, 5)]
    reasoner, actor = [True, False, True, False], [False, True, False, True]
    assert turns == [reasoner, reasoner, actor, actor, reasoner]
    with pytest.raises(ValueError, match="model.adapters"):
        agent_by_agent(torch.zeros(2), torch.zeros(2), adapter=None, step=1)


def test_team_reward_goes_to_the_last_agent():
    from forkrl.collect.reward_terms import team_reward
    from forkrl.types import EpisodeStep, Trajectory

    def t(group, episode, index, reward, correct):
        x = Trajectory(prompt_ids=[1], tokens=[2], logprobs=[0.0], entropies=[0.0], loss_mask=[1], group=group)
        x.episode_step, x.reward, x.correct = EpisodeStep(episode, index), reward, correct
        return x
    # the reasoner of e0 happened to write the right number: it still gets 0, the team's outcome is the actor's
    trajs = [t("g", "e0", 0, 1.0, 1.0), t("g", "e0", 1, 0.0, 0.0), t("g", "e1", 1, 1.0, 1.0), t("g", "e1", 0, 0.0, 0.0),
             t("h", "e0", 0, 0.0, 0.0), t("h", "e0", 1, 1.0, 1.0)]
    m = team_reward(trajs, None)
    assert [x.reward for x in trajs] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert [x.correct for x in trajs] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert [x.rewards["team_reward"] for x in trajs] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert m == {"marft/team_reward": pytest.approx(2 / 3), "marft/team_accuracy": pytest.approx(2 / 3)}


# -- agents as adapters of one model ----------------------------------------------------------------

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def agents():
    """The tiny model with adapters reasoner and actor, their B matrices randomised so they differ."""
    from forkrl.models.adapters import add_adapters
    from forkrl.models.loader import load_policy
    model, tok = load_policy("tiny-random", seed=0)
    model = add_adapters(model, ["reasoner", "actor"], LORA)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, tok


def test_both_adapters_train_and_the_context_restores_the_model(agents):
    from forkrl.models.adapters import active_adapter
    model, _ = agents
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".reasoner." in n for n in trainable) and any(".actor." in n for n in trainable)
    assert all("lora_" in n for n in trainable)
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(x).logits
        with active_adapter(model, "actor"):
            actor = model(x).logits
        after = model(x).logits
    assert model.active_adapter == "reasoner"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(before, after) and not torch.allclose(before, actor)
    with pytest.raises(ValueError, match="no LoRA adapter 'critic'"):
        with active_adapter(model, "critic"):
            pass


def test_the_engine_samples_each_agent_with_its_adapter(agents):
    """TorchEngine with `adapter` on the requests samples what the Hugging Face forward samples under
    that adapter; one call or stream runs one adapter."""
    from forkrl.models.adapters import active_adapter
    from forkrl.rollout import GenerationRequest, HFEngine, SamplingParams, TorchEngine
    model, tok = agents
    prompts = [tok("2 + 2 =")["input_ids"], tok("Count to five")["input_ids"]]
    fast = TorchEngine(model, tok, prefix_cache_mb=4)
    reference = HFEngine(model, tok, prefix_cache_mb=0)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    seen = {}
    for name in ("actor", "reasoner", "actor"):
        got = fast.generate([GenerationRequest(p, params, adapter=name) for p in prompts])
        with active_adapter(model, name):
            want = reference.generate([GenerationRequest(p, params) for p in prompts])
        for a, b in zip(got, want):
            assert a[0].token_ids == b[0].token_ids
            assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=2e-3)
        seen.setdefault(name, [o[0].token_ids for o in got])
    assert seen["actor"] != seen["reasoner"]
    assert model.active_adapter == "reasoner"
    with pytest.raises(ValueError, match="one adapter"):
        fast.generate([GenerationRequest(prompts[0], params, adapter="actor"),
                       GenerationRequest(prompts[1], params, adapter="reasoner")])
    stream = fast.stream(seed=0)
    stream.add(GenerationRequest(prompts[0], params, adapter="actor"))
    with pytest.raises(ValueError, match="must wait"):
        stream.add(GenerationRequest(prompts[1], params, adapter="reasoner"))


def test_the_learner_trains_each_rows_adapter_only(agents):
    """A micro-batch runs under its rows' adapter: the gradient of a loss on the actor's rows reaches
    the actor's adapter and not the reasoner's, and the log-probs are the actor's."""
    import copy

    from forkrl.models.adapters import active_adapter
    from forkrl.train.batch import micro_batches, pack
    from forkrl.train.forward import PolicyForward
    from forkrl.types import Trajectory
    model, _ = agents
    model = copy.deepcopy(model)
    rows = []
    for i, name in enumerate(["reasoner", "actor", "actor", "reasoner"]):
        t = Trajectory(prompt_ids=[3, 4, 5], tokens=[10 + i, 11, 12], logprobs=[0.0] * 3, entropies=[0.0] * 3,
                       loss_mask=[1, 1, 1], group="g")
        t.adapter = name
        rows.append(t)
    batch = pack(rows, 0)
    assert batch.adapter_names == ("reasoner", "actor")
    micros = micro_batches(batch, torch.arange(4), 16, 4096)
    assert [m.tolist() for m in micros] == [[0, 3], [1, 2]]
    forward = PolicyForward(model)
    actor_rows = batch.select(micros[1])
    logp, _ = forward(actor_rows)
    with active_adapter(model, "actor"):
        plain = copy.deepcopy(actor_rows)
        plain.adapter = None
        want, _ = forward(plain)
    assert torch.allclose(logp, want)
    logp.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".actor." in n and "lora_A" in n)
    assert all(g is None for n, g in grads.items() if ".reasoner." in n)
    with pytest.raises(ValueError, match="one adapter"):
        forward(batch)


def test_agents_prompts_show_the_earlier_agents_tagged_responses(agents):
    """The sampler on a scripted engine: the actor's prompt is its role, the task and the reasoner's
    response in <reasoner> tags; each request names its agent's adapter; each response is a step of
    its episode."""
    from forkrl.rollout.marft import MarftSampler
    from forkrl.rollout.samplers import SamplerContext
    from forkrl.types import Completion, Sample, SamplingParams
    _, tok = agents
    calls = []

    class Scripted:
        def generate(self, requests, seed=None):
            calls.append(requests)
            text = "I add 3 and 4." if requests[0].adapter == "reasoner" else "7"
            return [[Completion(tok(text, add_special_tokens=False)["input_ids"], [0.0], [0.0], "eos", text)]
                    for _ in requests]
    sampler = MarftSampler(agents=[{"name": "reasoner", "role": "Think."}, {"name": "actor", "role": "Answer."}])
    samples = [Sample(id="a", prompt="3 + 4 =", answer="7")]
    groups, metrics = sampler.sample(Scripted(), [[1]], SamplingParams(n=2, max_tokens=8), 0,
                                     SamplerContext(tokenizer=tok, samples=samples))
    assert [[r.adapter for r in c] for c in calls] == [["reasoner", "reasoner"], ["actor", "actor"]]
    actor_prompt = tok.decode(calls[1][0].prompt_ids)
    assert "Answer." in actor_prompt and "3 + 4 =\n\n<reasoner>I add 3 and 4.</reasoner>" in actor_prompt
    assert "<reasoner>" not in tok.decode(calls[0][0].prompt_ids)
    (group,) = groups
    assert [(t.adapter, t.episode_step.episode, t.episode_step.index) for t in group] == [
        ("reasoner", "e0", 0), ("actor", "e0", 1), ("reasoner", "e1", 0), ("actor", "e1", 1)]
    assert metrics["marft/actor/response_length"] == len(tok("7", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="agents"):
        MarftSampler(agents=[{"name": "a"}])


def test_gradient_checkpointing_recomputes_each_micro_batch_under_its_adapter(tmp_path):
    """Checkpointed layers run again in backward; the learner keeps the rows' adapter active there, so
    one MARFT update with checkpointing equals the update without it."""
    from forkrl.config import load_config
    from forkrl.train import Trainer

    def adapters_after_one_step(checkpointing: bool) -> dict:
        cfg = load_config("configs/marft.yaml", [
            "model.name=tiny-random", f"output_dir={tmp_path / str(checkpointing)}", "train.steps=1",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "task.train_size=20", "task.eval_size=4",
            "eval.at_start=false", "eval.every=0", "log.progress=false", "log.tensorboard=false", "train.lr=1e-2",
            "rollout.sampler_params.agents.0.max_tokens=6", "rollout.sampler_params.agents.1.max_tokens=4",
            'task.rewards=[{name: low_ids, function: "tests.rewards:low_token_ids"}]',
            f"train.gradient_checkpointing={str(checkpointing).lower()}", "log.entropy_probe_tokens=0"])
        trainer = Trainer(cfg)
        trainer.train()
        return trainer

    trainer = adapters_after_one_step(False)
    plain = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    checkpointed = {n: p for n, p in adapters_after_one_step(True).model.named_parameters() if "lora_" in n}
    moved = [n for n in plain if ".actor." in n and "lora_B" in n and plain[n].abs().sum() > 0]
    assert moved, "the actor's adapter did not train"
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n

    # the exported adapters load as the model card says, one subfolder per agent
    from peft import PeftModel

    from forkrl.models.adapters import active_adapter
    from forkrl.models.loader import load_policy
    out = tmp_path / "False" / "adapter"
    assert "load_adapter" in (out / "README.md").read_text()
    loaded = PeftModel.from_pretrained(load_policy("tiny-random", seed=0)[0], str(out / "reasoner"),
                                       adapter_name="reasoner")
    loaded.load_adapter(str(out / "actor"), adapter_name="actor")
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), active_adapter(trainer.model, "actor"), active_adapter(loaded, "actor"):
        assert torch.allclose(trainer.model(x).logits, loaded(x).logits, atol=1e-5)


def test_config_errors_name_the_field():
    from forkrl.config import ConfigError, load_config
    cases = {
        "model.lora=null": "model.adapters names LoRA adapters, but model.lora",
        "model.export=merged": "no single merged form",
        "model.adapters=[actor, reasoner]": "set model.adapters: ['reasoner', 'actor']",
        "task.reward_terms=[]": "add {name: team_reward}",
        "rollout.engine=vllm": "needs the engine feature 'adapters'",
        "rollout.sampler_params.agents.1.name=reasoner": "names must differ",
        "algo.critic.enabled=false;algo.advantage=grpo": "MARFT's credit comes from its critic",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("configs/marft.yaml", override.split(";"))


def test_a_policy_step_past_the_kl_bound_is_skipped(tmp_path):
    """algo.max_approx_kl (MARFT: 1e-3): with two epochs the first update starts at the old policy
    (KL 0) and steps; the second sees the moved policy, past a tiny bound, and is skipped."""
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg, _rows

    def skipped(bound) -> list:
        cfg = _cfg(tmp_path, out=str(bound), train={"steps": 2, "epochs": 2, "lr": 1e-2}, algo={"max_approx_kl": bound})
        Trainer(cfg).train()
        return [r.get("train/kl_skipped_updates") for r in _rows(cfg)]
    assert skipped(1e-9) == [1.0, 1.0]
    assert skipped(1e3) == [0.0, 0.0]
