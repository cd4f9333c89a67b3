"""UI-S1's semi-online rollouts for text agents (Lu et al., 2025, arXiv 2509.11543; algorithms.md §18).

Each task's expert trajectory is replayed step by step, `params.n` rollouts per task. At step t the
policy sees the task, then the history: its own earlier steps (or the expert's, where a step was
patched), each followed by the expert's observation, and writes step t. A step whose action matches
the expert's keeps the policy's own text in the history. On a mismatch the Patch Module puts the
expert's step there instead, at most `patch_threshold` times per rollout (-1: no limit); after that a
mismatch ends the rollout. Every step is one training sample (`Trajectory.episode_step`), scored by
the `uis1_step` reward against the expert's action; the `uis1` advantage turns the step rewards into
discounted, patch-cut returns.

The same replay without patching is UI-S1's SOP evaluation (`evaluation_rollout`): it stops at the
first mismatch; a rollout's reward is its progress rate (matched steps / steps) and its text is
`<answer>...</answer>` only when every step matched, so eval/reward is the SOP progress rate and
eval/accuracy the SOP success rate.
"""
from __future__ import annotations

import dataclasses

from forkrl.registry import register_sampler
from forkrl.tasks.semi_online import (
    action_score,
    expert_text,
    observation_text,
    parse_action,
)
from forkrl.types import EpisodeStep, GenerationRequest, Trajectory


@dataclasses.dataclass
class _Rollout:
    task: int
    name: str
    history: list[int]
    patches: int = 0
    alive: bool = True
    matched: int = 0
    answer: str | None = None


@register_sampler("semi_online")
class SemiOnlineSampler:
    def __init__(self, patch_threshold: int = 2):
        self.patch_threshold = patch_threshold

    def sample(self, engine, prompts, params, seed, ctx):
        groups, stats = self.replay(engine, ctx.tokenizer, prompts, ctx.samples, params, seed, ctx.version,
                                    self.patch_threshold)
        return groups, stats

    def evaluation_rollout(self, engine, tokenizer, version: int = 0):
        """SOP: the replay without patching; reward = progress rate, text = the answer when all matched."""
        def generate(prompts, samples, params, seed, groups=None):
            out, _ = self.replay(engine, tokenizer, prompts, samples, params, seed, version, patch_threshold=0,
                                 summaries=True)
            return out
        return generate

    @staticmethod
    def replay(engine, tokenizer, prompts, samples, params, seed, version, patch_threshold, summaries=False):
        """Per task, its step samples (training) or, with `summaries`, one trajectory per rollout carrying
        its SOP progress as reward (evaluation)."""
        one = dataclasses.replace(params, n=1)
        rollouts = [_Rollout(j, f"r{i}", []) for j in range(len(prompts)) for i in range(params.n)]
        steps_of = [s.columns.get("steps") or [] for s in samples]
        for s, steps in zip(samples, steps_of):
            if not steps:
                raise ValueError(f"sample {s.id!r} has no expert `steps`: the semi_online sampler replays expert "
                                 "trajectories (rows {prompt, answer, steps})")
        groups: list[list[Trajectory]] = [[] for _ in prompts]
        patched = 0
        t = 0
        while True:
            live = [r for r in rollouts if r.alive and t < len(steps_of[r.task])]
            if not live:
                break
            # the next step continues this one's prefix: keep its keys and values in the prefix cache
            requests = [GenerationRequest(prompts[r.task] + r.history, one, keep_kv=True) for r in live]
            outs = engine.generate(requests, seed=seed + 7919 * t)
            for r, req, o in zip(live, requests, outs):
                c = o[0]
                step = steps_of[r.task][t]
                matched = action_score(c.text, step["action"]) == 1.0
                traj = Trajectory.from_completion(req.prompt_ids, c, group="", version=version,
                                                  sample=dataclasses.replace(samples[r.task], columns={
                                                      **samples[r.task].columns, "expert_action": step["action"],
                                                      "step": t}))
                traj.episode_step = EpisodeStep(r.name, t, matched)
                if not summaries:
                    groups[r.task].append(traj)
                obs = tokenizer(observation_text(step), add_special_tokens=False)["input_ids"]
                if matched:
                    r.matched += 1
                    r.history += list(c.token_ids) + obs
                    action = parse_action(c.text)
                    r.answer = action[1] if action and action[0] == "answer" else r.answer
                elif patch_threshold < 0 or r.patches < patch_threshold:
                    r.patches += 1
                    patched += 1
                    r.history += tokenizer(expert_text(step), add_special_tokens=False)["input_ids"] + obs
                else:
                    r.alive = False
            t += 1
        if summaries:
            for r in rollouts:
                total = len(steps_of[r.task])
                done = r.matched == total
                traj = Trajectory(prompt_ids=prompts[r.task], tokens=[], logprobs=[], entropies=[], loss_mask=[],
                                  group="", text=f"<answer>{r.answer}</answer>" if done and r.answer else "",
                                  sample=samples[r.task])
                traj.reward = r.matched / total
                groups[r.task].append(traj)
        n_steps = sum(len(g) for g in groups)
        return groups, {"semi_online/step_samples": float(n_steps), "semi_online/patches": float(patched)}
