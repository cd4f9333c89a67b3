"""MARFT's multi-agent episodes (Liao et al., 2025, arXiv 2504.16129; algorithms.md §19).

Agents are roles served by one base model, each with its own LoRA adapter (`model.adapters`, one per
agent name). Within an episode step they act in profile order: agent k's prompt is its role (the
system message), the task, and the responses of agents 1..k-1, each tagged with its agent's name:

    system: <role of the actor>
    user:   What is 3 + 4?

            <reasoner>I add 3 and 4 ...</reasoner>

Every response is one training sample (`Trajectory.adapter` = its agent, `Trajectory.episode_step` =
(episode, position in the profile)), so the learner trains each agent's rows under its adapter and a
critic can chain the agents of an episode (`algo.critic`: `level: action` is MARFT-A, `token` MARFT-T).
The `team_reward` reward term gives the task's reward to the last agent and 0 to the others.
Episodes are one step long (MARFT's example script), so an agent's action does not change the task.

Evaluation (`evaluation_rollout`) runs the same chain and scores the last agent's answer: held-out
accuracy is the team's.
"""
from __future__ import annotations

import dataclasses

from forkrl.registry import register_sampler
from forkrl.tasks.task import chat_prompt_ids
from forkrl.types import EpisodeStep, GenerationRequest, Trajectory


def agent_prompt(tokenizer, role: str, task: str, earlier: list[tuple[str, str]]) -> list[int]:
    """Token ids of an agent's prompt: its role, the task and the earlier agents' tagged responses."""
    shown = "".join(f"\n\n<{name}>{text.strip()}</{name}>" for name, text in earlier)
    return chat_prompt_ids(tokenizer, [{"role": "system", "content": role}, {"role": "user", "content": task + shown}])


def _check(cfg, agents=(), **_) -> str | None:
    names = [a["name"] for a in agents]
    if cfg.model.adapters != names:
        return (f"the agents {names} each sample and train with their own LoRA adapter: set model.adapters: "
                f"{names} (got {cfg.model.adapters}) and model.lora")
    if not any(t["name"] == "team_reward" for t in cfg.task.reward_terms):
        return "MARFT gives the task's reward to the last agent: add {name: team_reward} to task.reward_terms"
    if not cfg.algo.critic.enabled:
        # a prompt's group holds every agent's rows: a group baseline would compare reasoners with actors
        return ("MARFT's credit comes from its critic (algo.critic.enabled: true, algo.advantage: gae; "
                "level: action for MARFT-A, token for MARFT-T)")
    return None


@register_sampler("marft", requires={"adapters"}, check=_check)
class MarftSampler:
    """`params.n` team episodes per prompt. agents: the profile, in order, each
    {name: (its adapter), role: (its system prompt), max_tokens: (optional; default rollout.max_new_tokens)}."""

    evaluation_rewards = False  # held-out scores are the task's, on the last agent's answer

    def __init__(self, agents: list[dict] | None = None):
        if not agents:
            raise ValueError("agents: list the profile in order, e.g. [{name: reasoner, role: ...}, {name: actor, "
                             "role: ...}]")
        for i, a in enumerate(agents):
            if not isinstance(a, dict) or set(a) - {"name", "role", "max_tokens"} or not {"name", "role"} <= set(a):
                raise ValueError(f"agents[{i}]: expected {{name, role, max_tokens (optional)}}, got {a!r}")
        names = [a["name"] for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agents: names must differ, got {names}")
        self.agents = agents

    def sample(self, engine, prompts, params, seed, ctx):
        episodes = self.episodes(engine, ctx.tokenizer, ctx.samples, params, seed, ctx.version)
        groups = [[t for episode in per_prompt for t in episode] for per_prompt in episodes]
        metrics = {f"marft/{a['name']}/response_length":
                   sum(len(e[k].tokens) for g in episodes for e in g) / max(sum(len(g) for g in episodes), 1)
                   for k, a in enumerate(self.agents)}
        return groups, metrics

    def episodes(self, engine, tokenizer, samples, params, seed, version: int = 0) -> list[list[list[Trajectory]]]:
        """Per prompt, its `params.n` episodes, each the agents' trajectories in profile order. Agent k's
        requests for every episode go to the engine in one call, under its adapter."""
        if samples is None:
            raise ValueError("the marft sampler builds each agent's prompt from the task's samples")
        one = dataclasses.replace(params, n=1)
        runs = [(j, i) for j in range(len(samples)) for i in range(params.n)]
        done: dict[tuple[int, int], list[Trajectory]] = {run: [] for run in runs}
        for k, agent in enumerate(self.agents):
            agent_params = dataclasses.replace(one, max_tokens=agent.get("max_tokens") or params.max_tokens)
            prompt_of = {run: agent_prompt(tokenizer, agent["role"], samples[run[0]].prompt,
                                           [(self.agents[m]["name"], t.text) for m, t in enumerate(done[run])])
                         for run in runs}
            requests = [GenerationRequest(prompt_of[run], agent_params, adapter=agent["name"]) for run in runs]
            outs = engine.generate(requests, seed=seed + 7919 * k)
            for run, out in zip(runs, outs):
                t = Trajectory.from_completion(prompt_of[run], out[0], group="", version=version,
                                               sample=samples[run[0]])
                t.adapter = agent["name"]
                t.episode_step = EpisodeStep(f"e{run[1]}", k)
                done[run].append(t)
        return [[done[(j, i)] for i in range(params.n)] for j in range(len(samples))]

    def evaluation_rollout(self, engine, tokenizer, version: int = 0):
        """The team's held-out answers: per prompt, the last agent's trajectories."""
        def generate(prompts, samples, params, seed, groups=None):
            episodes = self.episodes(engine, tokenizer, samples, params, seed, version)
            return [[episode[-1] for episode in per_prompt] for per_prompt in episodes]
        return generate
