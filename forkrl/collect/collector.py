"""The collection stage: task + position source + sampler + engine + env + scoring -> `RolloutBatch`.

    batch = collector.next_batch(step)          # sample, score, shape, gate
    collector.set_policy(version, feedback)     # after each update: the new version and what it measured

One step, as data:

    positions ─▶ samples ─▶ sampler(engine, env) ─▶ rewards ─▶ reward terms ─▶ gate 1 ─▶ … ─▶ gate k ─▶ batch

Reward terms (`task.reward_terms`) change each trajectory's reward after the task's rewards; group
gates (`rollout.gates`) run in recipe order on the scored groups and may ask for more through their
`Refill`: fresh groups (which pass the gates before them) or more samples of given prompts. Both are
registered functions (forkrl/collect/reward_terms.py, gates.py). Everything random is derived from
(seed, step, salt): a resumed run and one that never stopped draw the same samples, and rollout
workers of one run (different salts) draw different ones.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from forkrl.registry import GATES, REWARD_TERMS
from forkrl.rollout import GenerationRequest, SamplingParams, build_local_engine
from forkrl.rollout.samplers import (
    RolloutBudget,
    SamplerContext,
    build_sampler,
    run_sampler,
)
from forkrl.types import PolicyFeedback, RolloutBatch, Sample, Trajectory


def derive_seed(seed: int, step: int, sub: int, salt: int = 0) -> int:
    """The seed of one random choice of a step: `sub` names the choice, `salt` the rollout worker."""
    return (seed * 1_000_003 + step * 1009 + sub + salt * 7_919_993) % 2 ** 62


def groups_of(trajs: list[Trajectory]) -> list[list[Trajectory]]:
    """Trajectories by `group`, groups in order of first appearance."""
    by_group: dict[str, list[Trajectory]] = {}
    for t in trajs:
        by_group.setdefault(t.group, []).append(t)
    return list(by_group.values())


class LocalPositions:
    """The training stream's data positions, handed out in order (one process). A decoupled run
    gives rollout workers a source backed by a shared ledger instead (forkrl.distributed)."""

    def __init__(self):
        self.next = 0

    def take(self, k: int) -> list[int]:
        start, self.next = self.next, self.next + k
        return list(range(start, start + k))

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]


class RankPositions(LocalPositions):
    """One rank's share of the training stream (`forkrl train --nproc N`): when every rank takes k
    positions at once, rank r gets the r-th k of the N*k a single process would take, so the ranks
    together draw the prompts one process would, each exactly once."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world = rank, world

    def take(self, k: int) -> list[int]:
        start = self.next * self.world + self.rank * k
        self.next += k
        return list(range(start, start + k))


@dataclass
class CollectContext:
    """What reward terms and gates may read: the step, the recipe's group shape and lengths, the
    last policy feedback, and seeds derived for the step."""
    step: int
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    answer_tag: str
    feedback: PolicyFeedback
    seed_of: Callable[[int], int]  # this step's seed for the random choice `sub`
    # a reward term's own state across steps (plain lists and numbers; checkpointed with the collector)
    state: dict = field(default_factory=dict)

    def seed(self, sub: int) -> int:
        return self.seed_of(sub)


class Refill:
    """How a gate asks the collector for more, within one step: `fresh()` groups of new prompts,
    scored and passed through the gates listed before it; `resample(samples, n, ...)` more samples
    of given prompts."""

    def __init__(self, collector: Collector, step: int, gate_index: int, round_: int):
        self.collector, self.step, self.gate_index, self.round = collector, step, gate_index, round_

    def fresh(self) -> list[list[Trajectory]]:
        return self.collector.fresh_round(self.step, upto=self.gate_index)

    def resample(self, samples: list[Sample], n: int | None = None, *, sub: int, tag: str,
                 temperature: float | None = None, observe: bool = True) -> list[list[Trajectory]]:
        """`n` (default: rollout.samples_per_prompt) more samples of each of `samples`, scored, as one
        group per sample. `sub` and `tag` name the call (its seed and its group names); `observe=False`
        keeps them out of the step's rollout metrics (samples at another temperature)."""
        return self.collector.resample(samples, n, step=self.step, round_=self.round, sub=sub, tag=tag,
                                       temperature=temperature, observe=observe)


def build_env(cfg, model, tokenizer, seed_of_call: Callable[[], int]):
    """The tool env of `cfg.env` (None when disabled). Tools that need a frozen language model
    (ZeroSearch's simulated search writes documents with it, Router-R1's `lm` responders answer with
    it) share one: `model` in the simulated search's config, else a copy of the policy as it starts;
    `seed_of_call()` seeds each of its calls (the current policy version). Tools that price their
    calls count tokens with the policy's tokenizer."""
    if not cfg.env.enabled:
        return None
    from forkrl.envs import ToolEnv
    from forkrl.models import load_policy
    context = {"count_tokens": lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])}
    specs = [t for t in cfg.env.tools if isinstance(t, dict)]
    sim = [t for t in specs if t.get("name") == "simulated_search"]
    routed_lm = any(t.get("name") == "route" and any(r.get("kind") == "lm" for r in t.get("pool") or []) for t in specs)
    if sim or routed_lm:
        name = sim[0].get("model") if sim else None
        if name:
            sim_model, sim_tok = load_policy(name, dtype=cfg.model.dtype, seed=cfg.seed)
        else:
            sim_model, sim_tok = copy.deepcopy(model).eval(), tokenizer
        sim_engine = build_local_engine(sim_model, sim_tok, max_batch_size=cfg.rollout.max_batch_size)

        def generate(prompts, temperature: float = 0.7, max_tokens: int = 128):
            ids = [sim_tok(p)["input_ids"] for p in prompts]
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
            outs = sim_engine.generate([GenerationRequest(i, params) for i in ids], seed=seed_of_call())
            return [o[0].text for o in outs]
        context["generate"] = generate
    # `model` configures the document writer above, not the tool
    tools = [{k: v for k, v in t.items() if k != "model"} if isinstance(t, dict) else t for t in cfg.env.tools]
    return ToolEnv.from_config(cfg.env.model_copy(update={"tools": tools}), tokenizer=tokenizer, **context)


def _spec(entry: dict) -> tuple[str, dict]:
    entry = dict(entry)
    return entry.pop("name"), entry


class Collector:
    """Samples, scores, shapes and gates one step's groups (see the module docstring).

    `positions` is the data-position source (default: in order, this process); `seed_salt`
    distinguishes rollout workers of one run."""

    def __init__(self, cfg, *, task, engine, tokenizer, env=None, positions=None, seed_salt: int = 0):
        self.cfg, self.task, self.engine, self.tokenizer, self.env = cfg, task, engine, tokenizer, env
        self.positions = positions if positions is not None else LocalPositions()
        self.seed_salt = seed_salt
        self.sampler = build_sampler(cfg.rollout.sampler, cfg.rollout.sampler_params)
        self.terms = [(REWARD_TERMS.get(name), params) for name, params in map(_spec, cfg.task.reward_terms)]
        self.term_state: list[dict] = [{} for _ in self.terms]
        self.gates = [(GATES.get(name), params) for name, params in map(_spec, cfg.rollout.gates)]
        n = cfg.rollout.samples_per_prompt
        for gate, params in self.gates:  # a gate may ask for more samples per fresh prompt (GRPO-RoC)
            widen = GATES.hook(gate.registered_name, "samples_per_prompt")
            if widen is not None:
                n = widen(n, **params)
        self.fresh_samples = n
        self.version = 0
        self.feedback = PolicyFeedback()
        self._epoch_order: tuple[tuple[int, int] | None, list[int]] = (None, [])
        self._round = 0
        self._generated: list[Trajectory] = []
        self._budget = RolloutBudget()
        self._scoring_seconds = 0.0
        self._groups_wanted: int | None = None
        self._gate_metrics: dict = {}
        self._term_metrics: dict[str, tuple[float, int]] = {}  # reward terms' metrics this step: (weighted sum, count)

    # -- the source interface ---------------------------------------------------------------------
    def next_batch(self, step: int) -> RolloutBatch:
        t0 = time.perf_counter()
        self.engine.stats.decode_tokens = 0
        sync0 = self.engine.stats.sync_seconds
        self._scoring_seconds, self._budget, self._generated, self._round = 0.0, RolloutBudget(), [], 0
        self._term_metrics = {}
        # a step reuses only the prefixes it computed itself: what evaluation left in the cache must not
        # change training (nor differ between a resumed run and one that never stopped)
        self.engine.weights_updated()
        if self.env is not None:
            self.env.on_step((step - 1) / max(self.cfg.train.steps, 1))
        groups, stats = self._first_round(step)
        trajs = [t for g in groups for t in g]
        t_sample = time.perf_counter() - t0 - self._scoring_seconds
        metrics = {**stats, **self._budget.metrics(), "time/sampling_s": t_sample, "time/scoring_s": self._scoring_seconds,
                   **{k: v / max(n, 1) for k, (v, n) in self._term_metrics.items()},
                   # copying the updated weights into the engine's sampling weights (part of sampling_s)
                   "time/weight_sync_s": self.engine.stats.sync_seconds - sync0}
        return RolloutBatch(trajs, self._generated, metrics, self.engine.stats.decode_tokens)

    def set_policy(self, version: int, feedback: PolicyFeedback) -> None:
        """The learner's new policy version (stamped on the tokens sampled next) and its feedback. The
        engine's weights are the policy's own (same process) or were loaded by the caller."""
        self.version, self.feedback = version, feedback
        self.engine.weights_updated()

    def state_dict(self) -> dict:
        """Where the data stream is and what the sampler carries across steps (APRIL's groups in
        flight). The policy version and feedback are not here: the loop hands them back on resume."""
        return {"positions": self.positions.state_dict(), "sampler": getattr(self.sampler, "state", None),
                "terms": copy.deepcopy(self.term_state)}

    def load_state_dict(self, state: dict) -> None:
        self.positions.load_state_dict(state["positions"])
        if state.get("sampler") is not None:
            self.sampler.state = state["sampler"]
        if state.get("terms") is not None:
            self.term_state = copy.deepcopy(state["terms"])

    # -- stages -----------------------------------------------------------------------------------
    def seed(self, step: int, sub: int) -> int:
        return derive_seed(self.cfg.seed, step, sub, self.seed_salt)

    def context(self, step: int) -> CollectContext:
        r = self.cfg.rollout
        return CollectContext(step=step, prompts_per_step=r.prompts_per_step, samples_per_prompt=r.samples_per_prompt,
                              max_new_tokens=r.max_new_tokens, answer_tag=self.cfg.env.answer_tag or "answer",
                              feedback=self.feedback, seed_of=lambda sub: self.seed(step, sub))

    def _first_round(self, step: int) -> tuple[list[list[Trajectory]], dict]:
        self._gate_metrics = {}
        return self.fresh_round(step, len(self.gates)), self._gate_metrics

    def fresh_round(self, step: int, upto: int) -> list[list[Trajectory]]:
        """New prompts' groups, through the first `upto` gates (a later gate's refill, or all of them).
        A gate's metrics are summed over the rounds of the step (gates report counts)."""
        round_ = self._round
        groups = self._sample_fresh(step)
        for i, (gate, params) in enumerate(self.gates[:upto]):
            groups, m = gate(groups, Refill(self, step, i, round_), self.context(step), **params)
            for k, v in m.items():
                self._gate_metrics[k] = self._gate_metrics.get(k, 0) + v
        return groups

    def resample(self, samples: list[Sample], n: int | None, *, step: int, round_: int, sub: int, tag: str,
                 temperature: float | None = None, observe: bool = True) -> list[list[Trajectory]]:
        """More samples of given prompts for a gate (see `Refill.resample`), scored, one group each."""
        sub = sub + 10_007 * round_  # the same gate in a later round draws afresh
        trajs = self.rollout(samples, self.seed(step, sub), f"s{step}{tag}" + (f"r{round_}" if round_ else ""),
                             temperature=temperature, n=n)
        self.score(trajs, step)
        if observe:
            self._generated += trajs
        return groups_of(trajs)

    def _sample_fresh(self, step: int) -> list[list[Trajectory]]:
        """The step's next fresh prompts, sampled and scored; round k draws with seed `sub` = k."""
        k = self._round
        self._round += 1
        r = self.cfg.rollout
        trajs = self.rollout(self.fresh_prompts(r.prompts_per_step), self.seed(step, k),
                             f"s{step}" + (f"b{k}" if k else ""), n=self.fresh_samples)
        self.score(trajs, step)
        self._generated += trajs
        return groups_of(trajs)

    def fresh_prompts(self, groups: int) -> list[Sample]:
        """Prompts for a rollout that must return `groups` groups: as many, unless the sampler keeps
        groups across steps and asks for its own number (APRIL)."""
        self._groups_wanted = groups
        wanted = getattr(self.sampler, "prompts_wanted", None)
        return [self.sample_at(p) for p in self.positions.take(wanted(groups) if wanted is not None else groups)]

    def sample_at(self, pos: int) -> Sample:
        """The training sample at a data position: a fresh seeded shuffle every epoch."""
        n = len(self.task.train)
        epoch, i = divmod(pos, n)
        if self._epoch_order[0] != (epoch, n):  # one shuffle per epoch, not one per sample
            order = list(range(n))
            random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
            self._epoch_order = ((epoch, n), order)
        return dataclasses.replace(self.task.train[self._epoch_order[1][i]], position=pos)

    def rollout(self, samples: list[Sample], seed: int, tag: str, temperature: float | None = None,
                n: int | None = None) -> list[Trajectory]:
        """Sample `samples` with the recipe's sampler; every trajectory gets its group `tag/j:sample id`."""
        r = self.cfg.rollout
        adaptive = None
        stats = self.feedback.entropy_stats
        if r.adaptive_temperature.enabled and stats is not None:
            adaptive = (r.adaptive_temperature.tau, stats["mu"], stats["sigma"], stats["pos_scale"], stats["neg_scale"])
        params = SamplingParams(temperature=r.temperature if temperature is None else temperature, top_p=r.top_p,
                                max_tokens=r.max_new_tokens, n=n or r.samples_per_prompt, stop=list(r.stop),
                                adaptive_temperature=adaptive)
        prompt_ids = [self.task.prompt_ids(s, self.tokenizer) for s in samples]
        ctx = SamplerContext(env=self.env, tokenizer=self.tokenizer, version=self.version, step=self.version + 1,
                             samples=samples, groups=self._groups_wanted or len(samples))
        groups, budget = run_sampler(self.sampler, self.engine, prompt_ids, params, seed, ctx)
        self._budget.add(budget)  # summed over the step's rollout calls (refills); ratios from the sums
        out = []
        for j, members in enumerate(groups):
            s = members[0].sample if members and members[0].sample is not None else samples[j]
            for t in members:
                t.group = f"{tag}/{j}:{s.id}"
                if t.sample is None or t.sample.id != s.id:  # a sampler may give a trajectory its own columns
                    t.sample = s
                out.append(t)
        return out

    def score(self, trajs: list[Trajectory], step: int) -> None:
        """The task's rewards, then the recipe's reward terms, in order."""
        start = time.perf_counter()
        per_fn, total, correct = self.task.score([t.sample for t in trajs], [t.text for t in trajs],
                                                [[x for x, m in zip(t.tokens, t.loss_mask) if m] for t in trajs])
        for i, t in enumerate(trajs):
            t.rewards = {k: v[i] for k, v in per_fn.items()}
            t.reward = total[i]
            t.correct = correct[i]
        ctx = self.context(step)
        for (term, params), state in zip(self.terms, self.term_state):
            for k, v in (term(trajs, dataclasses.replace(ctx, state=state), **params) or {}).items():
                total_, n = self._term_metrics.get(k, (0.0, 0))  # a mean over the step's scored trajectories
                self._term_metrics[k] = (total_ + v * len(trajs), n + len(trajs))
        self._scoring_seconds += time.perf_counter() - start

