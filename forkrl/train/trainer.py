"""The RL loop: prompts -> rollouts -> rewards -> (dynamic sampling) -> learner -> metrics/eval/checkpoints.

One `Trainer.step()` is one pass of DESIGN.md's data flow. Everything random is derived from
(seed, step), and the checkpoint carries the rest, so a resumed run repeats the metrics of a run
that never stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from forkrl.algos import ADVANTAGES, SELECTORS
from forkrl.algos.entropy_losses import hapo_entropy_stats
from forkrl.algos.selection import overlong_penalty
from forkrl.config import RunConfig
from forkrl.metrics import evaluate, make_sinks
from forkrl.metrics.entropy import entropy_stats, fit_entropy_law
from forkrl.metrics.sinks import SampleLog
from forkrl.metrics.tools import tool_metrics
from forkrl.models import load_policy
from forkrl.rollout import (
    GenerationRequest,
    SamplingParams,
    TorchEngine,
    Trajectory,
    build_engine,
)
from forkrl.rollout.samplers import SamplerContext, build_sampler, run_sampler
from forkrl.tasks import Sample, Task, build_task
from forkrl.tasks.flaws import load_detector
from forkrl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from forkrl.train.learner import Learner, NonFiniteLoss
from forkrl.train.replay import ReplayBuffer, cosine_decay, cosine_ramp

log = logging.getLogger("forkrl")


def lr_lambda(t):
    """Multiplier of train.lr at optimizer step s: linear warm-up over warmup_steps, then constant,
    cosine or linear decay to min_lr_ratio at train.steps."""
    warm, total, floor = t.warmup_steps, t.steps, t.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if t.schedule == "constant":
            return 1.0
        p = min(max((s - warm) / max(total - warm, 1), 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * p)) if t.schedule == "cosine" else 1 - p
        return floor + (1 - floor) * decay
    return f


def peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux


@dataclasses.dataclass
class RolloutBatch:
    """What one step's sampling hands to the learner: the trajectories to train on, everything
    generated (for the rollout metrics), the sampling metrics and the number of decoded tokens."""
    trajectories: list[Trajectory]
    generated: list[Trajectory]
    metrics: dict
    decoded_tokens: int

    @classmethod
    def merge(cls, parts: list[RolloutBatch]) -> RolloutBatch:
        """Several workers' batches as one; counts and seconds add up (sampling seconds are summed
        over workers, not wall time)."""
        metrics: dict = {}
        for p in parts:
            for k, v in p.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        return cls([t for p in parts for t in p.trajectories], [t for p in parts for t in p.generated],
                   metrics, sum(p.decoded_tokens for p in parts))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: RunConfig, *, model=None, tokenizer=None, task: Task | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        if model is None:
            model, tokenizer = load_policy(cfg.model.name, dtype=cfg.model.dtype, lora=cfg.model.lora, seed=cfg.seed)
        self.model, self.tokenizer = model, tokenizer
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.task = task if task is not None else build_task(cfg.task, seed=cfg.seed)
        self.engine = build_engine(cfg.rollout, model, tokenizer, seed=cfg.seed)
        self.env = self._build_env() if cfg.env.enabled else None
        self.sampler = build_sampler(cfg.rollout.sampler, cfg.rollout.sampler_params)
        self.step_budget: dict[str, float] = {}
        self.groups_wanted: int | None = None
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        t = cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.demos = None
        if cfg.sft.train_path:
            from forkrl.tasks.conversations import load_conversations
            self.demos = load_conversations(cfg.sft.train_path, tokenizer, cfg.sft.result_tag)
            if cfg.sft.epochs:
                t.steps = math.ceil(cfg.sft.epochs * len(self.demos) / cfg.sft.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.learner = Learner(model, self.optimizer, self.scheduler, cfg, ref_model=self.ref_model,
                               pad_id=self.engine.pad_id, temperature=cfg.rollout.temperature or 1.0,
                               max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed)
        self.step_idx = 0          # completed RL steps
        self.data_pos = 0          # training prompts consumed
        self.nonfinite_streak = 0
        self.history: list[dict] = []
        self._stop_requested = False
        self.scoring_seconds = 0.0
        a = cfg.algo
        self.replay = ReplayBuffer(a.replay) if a.replay.enabled else None
        self.flaw_detector = load_detector(a.flawed_positive.detector) if a.flawed_positive.enabled else None
        self._last_generated: list[Trajectory] = []
        self.sampler_stats: dict = {}  # from the last trained batch: HAPO's entropy statistics, its policy entropy
        # where rollouts come from: None = this process (sample_step); a decoupled run sets an object with
        # next_batch(trainer) -> RolloutBatch and a checkpointed `state` (forkrl.distributed)
        self.rollouts = None
        self.seed_salt = 0  # rollout workers of one run draw different seeds at the same step
        self._epoch_order: tuple[tuple[int, int] | None, list[int]] = (None, [])  # sample_at's shuffle of the current epoch

    def _build_env(self):
        from forkrl.envs import ToolEnv
        context = {}
        sim = [t for t in self.cfg.env.tools if isinstance(t, dict) and t.get("name") == "simulated_search"]
        if sim:
            # ZeroSearch: a frozen language model writes the documents (by default a copy of the policy)
            name = sim[0].get("model")
            if name:
                sim_model, sim_tok = load_policy(name, dtype=self.cfg.model.dtype, seed=self.cfg.seed)
            else:
                sim_model, sim_tok = copy.deepcopy(self.model).eval(), self.tokenizer
            sim_engine = TorchEngine(sim_model, sim_tok, max_batch_size=self.cfg.rollout.max_batch_size)
            sim_params = SamplingParams(temperature=0.7, max_tokens=128)

            def generate(prompts):
                ids = [sim_tok(p)["input_ids"] for p in prompts]
                outs = sim_engine.generate([GenerationRequest(i, sim_params) for i in ids], seed=self.step_idx)
                return [o[0].text for o in outs]
            context["generate"] = generate
            for t in sim:
                t.pop("model", None)
        return ToolEnv.from_config(self.cfg.env, tokenizer=self.tokenizer, **context)

    def _tool_rollout(self, prompts, samples, params, seed, groups=None):
        from forkrl.rollout.agent import multi_turn_rollout
        groups = groups or [str(i) for i in range(len(prompts))]
        trajs = multi_turn_rollout(self.engine, self.env, self.tokenizer, prompts, groups, samples, params, seed,
                                   version=self.step_idx)
        return [trajs[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    # -- data ----------------------------------------------------------------------------------
    def fresh_prompts(self, groups: int) -> list[Sample]:
        """Prompts for a rollout that must return `groups` groups: as many, unless the sampler keeps
        groups across steps and asks for its own number (APRIL)."""
        self.groups_wanted = groups
        wanted = getattr(self.sampler, "prompts_wanted", None)
        return self.next_prompts(wanted(groups) if wanted is not None else groups)

    def next_prompts(self, k: int) -> list[Sample]:
        """The next k training samples, each stamped with its data position."""
        return [self.sample_at(pos) for pos in self.take_positions(k)]

    def take_positions(self, k: int) -> list[int]:
        """The next k data positions. Replaced in decoupled runs (forkrl.distributed), where workers
        take positions from a shared queue."""
        start = self.data_pos
        self.data_pos += k
        return list(range(start, start + k))

    def sample_at(self, pos: int) -> Sample:
        """The training sample at a data position: a fresh seeded shuffle every epoch."""
        n = len(self.task.train)
        epoch, i = divmod(pos, n)
        if self._epoch_order[0] != (epoch, n):  # one shuffle per epoch, not one per sample
            order = list(range(n))
            random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
            self._epoch_order = ((epoch, n), order)
        return dataclasses.replace(self.task.train[self._epoch_order[1][i]], position=pos)

    # -- rollout and scoring -------------------------------------------------------------------
    def rollout(self, samples: list[Sample], seed: int, tag: str, temperature: float | None = None,
                n: int | None = None) -> list[Trajectory]:
        r = self.cfg.rollout
        adaptive = None
        if r.adaptive_temperature.enabled and "hapo" in self.sampler_stats:
            h = self.sampler_stats["hapo"]
            adaptive = (r.adaptive_temperature.tau, h["mu"], h["sigma"], h["pos_scale"], h["neg_scale"])
        params = SamplingParams(temperature=r.temperature if temperature is None else temperature, top_p=r.top_p,
                                max_tokens=r.max_new_tokens, n=n or r.samples_per_prompt, stop=list(r.stop),
                                adaptive_temperature=adaptive)
        prompt_ids = [self.task.prompt_ids(s, self.tokenizer) for s in samples]
        ctx = SamplerContext(env=self.env, tokenizer=self.tokenizer, version=self.step_idx, step=self.step_idx + 1,
                             samples=samples, groups=self.groups_wanted or len(samples))
        groups, budget = run_sampler(self.sampler, self.engine, prompt_ids, params, seed, ctx)
        for k, v in budget.metrics().items():  # summed over the step's rollout calls (dynamic sampling)
            self.step_budget[k] = self.step_budget.get(k, 0.0) + v
        out = []
        for j, members in enumerate(groups):
            s = members[0].sample if members and members[0].sample is not None else samples[j]
            for t in members:
                t.group, t.sample = f"{tag}/{j}:{s.id}", s
                out.append(t)
        return out

    def score(self, trajs: list[Trajectory]) -> None:
        start = time.perf_counter()
        per_fn, total, correct = self.task.score([t.sample for t in trajs], [t.text for t in trajs],
                                                [[x for x, m in zip(t.tokens, t.loss_mask) if m] for t in trajs])
        ov = self.cfg.algo.overlong
        if ov.enabled:
            lengths = torch.tensor([t.num_generated for t in trajs])
            pen = overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, ov.buffer, ov.factor).tolist()
            per_fn["overlong"] = pen
            total = [a + b for a, b in zip(total, pen)]
        fp = self.cfg.algo.flawed_positive
        if self.flaw_detector is not None:
            # FAPO (algorithms.md §13.5): only correct rollouts are checked; a flawed one loses `penalty`
            pen = [-fp.penalty if c >= 1 and self.flaw_detector(t.sample.prompt, t.text, t.sample.answer) >= 0 else 0.0
                   for t, c in zip(trajs, correct)]
            per_fn["flawed_positive"] = pen
            total = [a + b for a, b in zip(total, pen)]
        rp = self.cfg.algo.replay
        if self.replay is not None and rp.tool_reward:
            # SPEAR's intrinsic tool reward (§13.4 step 2), decayed; a wrong answer's total is capped at 0
            coef = cosine_decay(self.step_idx, rp.tool_reward_steps, rp.tool_reward)
            bonus = [coef * len(t.tool_calls) for t in trajs]
            per_fn["tool_calls"] = bonus
            total = [a + b if c >= 1 else min(0.0, a + b) for a, b, c in zip(total, bonus, correct)]
        for i, t in enumerate(trajs):
            t.rewards = {k: v[i] for k, v in per_fn.items()}
            t.reward = total[i]
            t.correct = correct[i]
        self.scoring_seconds += time.perf_counter() - start

    def sft_batch(self) -> list[Trajectory]:
        """The next batch of demonstrations: a seeded shuffle per epoch; with group_by_length, windows of
        8 batches are sorted by length before they are cut, so a batch holds similar lengths."""
        c = self.cfg.sft
        n = len(self.demos)
        per_epoch = math.ceil(n / c.batch_size)
        epoch, b = divmod(self.data_pos, per_epoch)
        order = list(range(n))
        random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
        if c.group_by_length:
            window = 8 * c.batch_size
            order = [i for w in range(0, n, window)
                     for i in sorted(order[w:w + window], key=lambda i: len(self.demos[i].tokens))]
        self.data_pos += 1
        return [Trajectory(prompt_ids=d.prompt_ids, tokens=d.tokens, logprobs=[0.0] * len(d.tokens),
                           entropies=[0.0] * len(d.tokens), loss_mask=d.loss_mask, group=d.source, advantage=1.0)
                for d in (self.demos[i] for i in order[b * c.batch_size:(b + 1) * c.batch_size])]

    def collect(self, step: int) -> tuple[list[Trajectory], list[Trajectory], dict]:
        """(trajectories to train on, all generated trajectories, stats) for one step. With DAPO
        dynamic sampling only groups with reward variance train, refilled from further generation
        batches up to `max_gen_batches`."""
        if self.demos is not None:
            return self.sft_batch(), [], {}
        trajs, generated, stats = self._collect_groups(step)
        if self.cfg.algo.entropy_target.enabled and trajs:
            trajs, reg_stats = self._entropy_target_samples(step, trajs)
            stats.update(reg_stats)
        return trajs, generated, stats

    def _entropy_target_samples(self, step: int, trajs: list[Trajectory]) -> tuple[list[Trajectory], dict]:
        """Arbitrary-Entropy PO (algorithms.md §13.3 b): resample a quarter of this step's prompts hotter
        (entropy below target) or colder, keep the samples whose GRPO advantage exceeds 0.05 with
        advantage 1, and let them take the place of the first n_reg rows of the batch (which keep
        shaping their groups' statistics but do not train)."""
        et = self.cfg.algo.entropy_target
        entropy = self.sampler_stats.get("policy_entropy")
        if entropy is None:
            return trajs, {}  # no update has reported the policy entropy yet
        below = entropy <= et.target
        temperature = et.t_high if below else et.t_low
        samples = list({t.group: t.sample for t in trajs}.values())
        k = max(1, math.ceil(et.prompt_frac * len(samples)))
        extra = self.rollout(samples[:k], self._seed(step, 997), f"s{step}reg", temperature=temperature)
        self.score(extra)
        groups = {g: i for i, g in enumerate(dict.fromkeys(t.group for t in extra))}
        gid = torch.tensor([groups[t.group] for t in extra])
        rewards = torch.tensor([t.reward for t in extra])
        adv, _ = ADVANTAGES["grpo"](rewards, gid, torch.ones(len(extra), 1))
        kept = [t for t, a in zip(extra, adv[:, 0].tolist()) if a > et.adv_threshold]
        n_reg = min(et.max_samples, len(kept), len(trajs))
        if not below:
            n_reg //= 2
        for t in kept[:n_reg]:
            t.advantage = 1.0
        out = [dataclasses.replace(t, source="stats_only") for t in trajs[:n_reg]] + kept[:n_reg] + trajs[n_reg:]
        return out, {"entropy_target/temperature": temperature, "entropy_target/rows": float(n_reg),
                     "entropy_target/kept": float(len(kept))}

    def _resample_on_correct(self, step: int) -> tuple[list[Trajectory], list[Trajectory], dict]:
        """GRPO-RoC (algorithms.md §13.6): oversample, drop all-equal groups, keep the cleanest successes."""
        from forkrl.algos.selection import resample_on_correct
        from forkrl.rollout.agent import roc_penalty
        r, roc = self.cfg.rollout, self.cfg.rollout.resample_on_correct
        n = r.samples_per_prompt
        trajs = self.rollout(self.fresh_prompts(r.prompts_per_step), self._seed(step, 0), f"s{step}",
                             n=n * roc.oversample)
        self.score(trajs)
        gen = torch.Generator().manual_seed(self._seed(step, 5))
        kept: list[Trajectory] = []
        groups = list(dict.fromkeys(t.group for t in trajs))
        answer_tag = self.cfg.env.answer_tag or "answer"
        for g in groups:
            members = [t for t in trajs if t.group == g]
            if len({t.reward for t in members}) == 1:
                continue
            idx = resample_on_correct(torch.tensor([t.correct for t in members]),
                                      torch.tensor([roc_penalty(t, answer_tag) for t in members]), n,
                                      min_each=roc.min_each, generator=gen)
            kept += [members[i] for i in idx.tolist()]
        stats = {"roc/kept_groups": float(len(kept) // max(n, 1)), "roc/pool": float(len(trajs)),
                 "roc/kept_accuracy": float(np.mean([t.correct for t in kept])) if kept else 0.0}
        return kept, trajs, stats

    def _collect_groups(self, step: int) -> tuple[list[Trajectory], list[Trajectory], dict]:
        r, ds = self.cfg.rollout, self.cfg.algo.dynamic_sampling
        if r.resample_on_correct.enabled:
            return self._resample_on_correct(step)
        if not ds.enabled:
            trajs = self.rollout(self.fresh_prompts(r.prompts_per_step), self._seed(step, 0), f"s{step}")
            self.score(trajs)
            if r.dars.enabled:
                return self._dars(step, trajs)
            return trajs, trajs, {}
        kept: list[Trajectory] = []
        all_trajs: list[Trajectory] = []
        n_groups, gen_batches = 0, 0
        while n_groups < r.prompts_per_step and (ds.max_gen_batches == 0 or gen_batches < ds.max_gen_batches):
            trajs = self.rollout(self.fresh_prompts(r.prompts_per_step), self._seed(step, gen_batches),
                                 f"s{step}b{gen_batches}")
            self.score(trajs)
            gen_batches += 1
            all_trajs += trajs
            groups = {g: i for i, g in enumerate(dict.fromkeys(t.group for t in trajs))}
            values = torch.tensor([t.correct if ds.metric == "correct" else t.reward for t in trajs])
            keep = SELECTORS["nonzero_std_groups"](values, torch.tensor([groups[t.group] for t in trajs]))
            for g in dict.fromkeys(t.group for t, k in zip(trajs, keep.tolist()) if k):
                if n_groups < r.prompts_per_step:
                    kept += [t for t in trajs if t.group == g]
                    n_groups += 1
        if n_groups < r.prompts_per_step:
            log.warning("step %d: dynamic sampling kept %d of %d groups after %d generation batches",
                        step, n_groups, r.prompts_per_step, gen_batches)
        return kept, all_trajs, {"dapo/gen_batches": gen_batches, "dapo/kept_groups": n_groups}

    def _dars(self, step: int, first: list[Trajectory]) -> tuple[list[Trajectory], list[Trajectory], dict]:
        """DARS' second round (algorithms.md §12.1): ΔN more rollouts for each low-accuracy prompt,
        merged into its group; groups whose merged accuracy is 0 or 1 are dropped."""
        from forkrl.rollout.dars import dars_extra
        d = self.cfg.rollout.dars
        groups = {g: [t for t in first if t.group == g] for g in dict.fromkeys(t.group for t in first)}
        extra: dict[str, int] = {}
        value = (lambda t: float(t.correct >= 1)) if d.metric == "correct" else (lambda t: t.reward)
        for g, members in groups.items():
            acc = sum(value(t) for t in members) / len(members)
            extra[g] = dars_extra(acc, len(members), d.schedule, d.n_max, d.std_normalized)
        added: list[Trajectory] = []
        for k in sorted(set(extra.values()) - {0}):  # one generation call per distinct count
            names = [g for g in groups if extra[g] == k]
            more = self.rollout([groups[g][0].sample for g in names], self._seed(step, 500 + k), f"s{step}dars{k}", n=k)
            self.score(more)
            for t in more:  # join the first-round group of the same prompt
                t.group = next(g for g in names if groups[g][0].sample is t.sample)
            added += more
        merged = first + added
        varied = {g for g in {t.group for t in merged} if len({value(t) for t in merged if t.group == g}) > 1}
        kept = [t for t in merged if t.group in varied]
        stats = {"dars/extra_rollouts": float(len(added)), "dars/boosted_prompts": float(sum(v > 0 for v in extra.values())),
                 "dars/dropped_groups": float(len({t.group for t in merged}) - len({t.group for t in kept}))}
        return kept, merged, stats

    def _seed(self, step: int, sub: int) -> int:
        return (self.cfg.seed * 1_000_003 + step * 1009 + sub + self.seed_salt * 7_919_993) % 2 ** 62

    def _token_samples(self, k: int = 2) -> list[dict]:
        """The first k trajectories of the last step, as token strings with entropy and mask."""
        out = []
        for t in self._last_generated[:k]:
            pieces = [self.tokenizer.decode([x]) for x in t.tokens]
            out.append({"prompt": t.sample.prompt if t.sample is not None else "", "tokens": pieces,
                        "entropy": [None if e is None or math.isnan(e) else round(e, 4) for e in t.entropies],
                        "mask": list(t.loss_mask), "reward": t.reward, "correct": t.correct})
        return out

    def rollout_metrics(self, generated: list[Trajectory]) -> dict:
        """What the policy did this step, over everything sampled (the learner reports what it trained on)."""
        lengths = [t.num_generated for t in generated]
        metrics = {
            "reward/mean": float(np.mean([t.reward for t in generated])),
            "reward/std": float(np.std([t.reward for t in generated])),
            "accuracy": float(np.mean([t.correct for t in generated])),
            "response_length/mean": float(np.mean(lengths)), "response_length/max": float(np.max(lengths)),
            "response/clip_frac": float(np.mean([t.finish == "length" for t in generated])),
            "rollout/entropy": float(np.mean([e for t in generated for e, m in zip(t.entropies, t.loss_mask) if m])),
        }
        for name in generated[0].rewards:
            metrics[f"reward/{name}"] = float(np.mean([t.rewards[name] for t in generated]))
        if self.env is not None:
            metrics.update(tool_metrics(generated, list(self.env.tools)))
        metrics.update(entropy_stats(generated))
        return metrics

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> dict:
        """One RL step: sample and score (`sample_step`), then learn from it (`learn_step`)."""
        t0 = time.perf_counter()
        if self.rollouts is None:
            batch = self.sample_step(self.step_idx + 1)
        else:
            batch = self.rollouts.next_batch(self)
        return self.learn_step(batch, t0)

    def sample_step(self, step: int) -> RolloutBatch:
        """Rollouts for one step, scored; what a rollout worker does in a decoupled run."""
        t0 = time.perf_counter()
        self.engine.stats.decode_tokens = 0
        sync0 = self.engine.stats.sync_seconds
        self.scoring_seconds = 0.0
        self.step_budget = {}
        # a step reuses only the prefixes it computed itself: what evaluation left in the cache must not
        # change training (nor differ between a resumed run and one that never stopped)
        self.engine.weights_updated()
        if self.env is not None:
            self.env.on_step(self.learner.progress(step))
        trajs, generated, stats = self.collect(step)
        t_sample = time.perf_counter() - t0 - self.scoring_seconds
        metrics = {**stats, **self.step_budget, "time/sampling_s": t_sample, "time/scoring_s": self.scoring_seconds,
                   # copying the updated weights into the engine's sampling weights (part of sampling_s)
                   "time/weight_sync_s": self.engine.stats.sync_seconds - sync0}
        return RolloutBatch(trajs, generated, metrics, self.engine.stats.decode_tokens)

    def learn_step(self, batch: RolloutBatch, t0: float | None = None) -> dict:
        """Rollout metrics, one update on `batch.trajectories`, the run's running totals."""
        step = self.step_idx + 1
        t0 = time.perf_counter() if t0 is None else t0
        trajs, generated = batch.trajectories, batch.generated
        # rollout metrics describe everything sampled this step (what the policy does), the
        # learner's metrics what it trained on
        metrics: dict = dict(batch.metrics)
        if "sampler/trajectories" in metrics:  # ratios of the step's totals, not sums of ratios
            metrics["sampler/tokens_per_trajectory"] = (metrics["sampler/decoded_tokens"] + metrics[
                "sampler/prefilled_tokens"]) / max(metrics["sampler/trajectories"], 1)
        self._last_generated = generated
        if generated:
            metrics.update(self.rollout_metrics(generated))
        t1 = time.perf_counter()
        replay_coef, replayed = 1.0, []
        if self.replay is not None:
            replayed, replay_stats = self.replay.sample(step, self._seed(step, 991))
            metrics.update(replay_stats)
            replay_coef = cosine_ramp(step, self.cfg.algo.replay.warmup_steps, self.cfg.algo.replay.loss_coef)
        if trajs:
            on_policy = list(trajs)
            metrics.update(self.learner.update(trajs + replayed, step, replay_coef=replay_coef))
            self.engine.weights_updated()
            if self.replay is not None:
                metrics["replay/added"] = float(self.replay.add(step, on_policy, self.learner.last_seq_adv[:len(on_policy)]))
            self._update_sampler_stats(trajs, metrics)
        else:
            log.warning("step %d: no trajectories to train on; weights unchanged", step)
        t_learn = time.perf_counter() - t1
        skipped = metrics.get("train/nonfinite_updates", 0) > 0
        if skipped:
            self.nonfinite_streak += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                        self.nonfinite_streak)
        else:
            self.nonfinite_streak = 0
        # what the run has spent so far (checkpointed with the sampler state, so resumes continue it)
        totals = self.sampler_stats.setdefault("totals", {"sampled_tokens": 0, "tool_calls": 0, "seconds": 0.0})
        totals["sampled_tokens"] += batch.decoded_tokens
        totals["tool_calls"] += sum(len(t.tool_calls) for t in generated)
        totals["seconds"] += time.perf_counter() - t0
        metrics.update({"budget/sampled_tokens": float(totals["sampled_tokens"]),
                        "budget/tool_calls": float(totals["tool_calls"]), "time/total_s": totals["seconds"]})
        metrics.update({
            "time/learning_s": t_learn, "time/step_s": time.perf_counter() - t0,
            "throughput/sampling_tokens_per_s": batch.decoded_tokens / max(metrics["time/sampling_s"], 1e-9),
            "throughput/training_tokens_per_s": metrics.get("train/tokens", 0.0) / max(t_learn, 1e-9),
            "memory/peak_rss_gb": peak_rss_gb(),
        })
        self.step_idx = step
        return metrics

    def _update_sampler_stats(self, trajs: list[Trajectory], metrics: dict) -> None:
        """What the next rollout needs from this update: HAPO's entropy statistics of the batch just
        trained on (algorithms.md §7 step 1) and the policy entropy it reported (§13.3)."""
        if "policy/entropy" in metrics:
            self.sampler_stats["policy_entropy"] = float(metrics["policy/entropy"])
        at = self.cfg.rollout.adaptive_temperature
        if at.enabled:
            ent = [e for t in trajs if t.source == "policy" for e, m in zip(t.entropies, t.loss_mask) if m]
            if ent:
                x = torch.tensor(ent)
                self.sampler_stats["hapo"] = hapo_entropy_stats(x, torch.ones_like(x), at.pivot)
                metrics["rollout/adaptive_temperature"] = 1.0

    def budget_spent(self) -> bool:
        """train.token_budget: stop once this many tokens have been sampled (steps stays an upper bound)."""
        budget = self.cfg.train.token_budget
        return budget is not None and self.sampler_stats.get("totals", {}).get("sampled_tokens", 0) >= budget

    def _entropy_law(self, metrics: dict) -> dict:
        """Refit R = -a exp(H) + b on every (sampling entropy, held-out accuracy) point so far; the
        headroom is the fitted ceiling minus the current accuracy, and a run whose entropy falls
        while under 0.05 of headroom is flagged as collapsing."""
        if metrics.get("rollout/entropy") is None or "eval/accuracy" not in metrics:
            return {}
        points = self.sampler_stats.setdefault("law_points", [])
        points.append([metrics["rollout/entropy"], metrics["eval/accuracy"]])
        if len(points) < 3 or len({round(h, 9) for h, _ in points}) < 3:
            return {}
        law = fit_entropy_law([h for h, _ in points], [r for _, r in points])
        headroom = law.ceiling - metrics["eval/accuracy"]
        falling = points[-1][0] < points[-2][0]
        return {"law/a": law.a, "law/b": law.b, "law/ceiling": law.ceiling, "law/ceiling_se": law.ceiling_se,
                "law/headroom": headroom, "law/collapsing": float(falling and headroom < 0.05)}

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        e, r = self.cfg.eval, self.cfg.rollout
        samples = self.task.eval[:e.size] if e.size else self.task.eval
        res = evaluate(self.engine, self.task, samples, max_new_tokens=e.max_new_tokens or r.max_new_tokens,
                       stop=r.stop, pass_k=e.pass_k, n_samples=e.samples, temperature=e.temperature,
                       seed=self.cfg.seed + 17, generate=self._tool_rollout if self.env is not None else None,
                       tools=self.env is not None)
        res.pop("examples", None)
        return res

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"data_pos": self.data_pos, "nonfinite_streak": self.nonfinite_streak}
        methods = {"learner": self.learner.state, "sampler": self.sampler_stats,
                   "replay": self.replay.state_dict() if self.replay is not None else None,
                   "rollout_sampler": getattr(self.sampler, "state", None),
                   "rollouts": self.rollouts.state if self.rollouts is not None else None}
        return save_checkpoint(self.out, self.step_idx, self.model, self.optimizer, self.scheduler, state,
                               methods=methods)

    def resume(self) -> bool:
        path = latest_checkpoint(self.out)
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step_idx, self.data_pos = state["step"], state["data_pos"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        methods = state.get("methods", {})
        self.learner.state = methods.get("learner", {})
        self.sampler_stats = methods.get("sampler", {})
        if methods.get("rollout_sampler") is not None:
            self.sampler.state = methods["rollout_sampler"]
        if self.replay is not None and methods.get("replay"):
            self.replay.load_state_dict(methods["replay"])
        if self.rollouts is not None and methods.get("rollouts") is not None:
            self.rollouts.state = methods["rollouts"]
        log.info("resumed from %s (step %d)", path, self.step_idx)
        return True

    def export(self) -> Path:
        """The trained policy as a Hugging Face folder (LoRA merged), loadable as model.name."""
        path = self.out / "final"
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    # -- the loop ------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("Ctrl-C: finishing this step, then saving a checkpoint (press again to abort now)")

    def train(self, resume: bool = False) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(json.dumps(cfg.model_dump(), indent=1))
        resumed = self.resume() if resume else False
        if resume and not resumed:
            log.info("no checkpoint in %s; starting from scratch", self.out)
        sinks = make_sinks(self.out, cfg, self.step_idx if resumed else None)
        sample_log = SampleLog(self.out / "samples.jsonl", self.step_idx if resumed else None)
        summary: dict = {}
        # Ctrl-C handling needs the main thread (a Ray actor may run us elsewhere)
        main = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if main else None
        try:
            if cfg.eval.at_start and self.step_idx == 0:
                before = self.evaluate()
                summary["before"] = before
                for s in sinks:
                    s.write(0, before)
                log.info("held-out before training: %s", _fmt(before))
            bar = _progress(cfg, self.step_idx)
            while self.step_idx < cfg.train.steps and not self.budget_spent():
                metrics = self.step()
                step = self.step_idx
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                    metrics.update(self.evaluate())
                    metrics.update(self._entropy_law(metrics))
                for s in sinks:
                    s.write(step, metrics)
                sample_log.write(step, self._token_samples())
                self.history.append(metrics)
                if bar is not None:
                    bar.set_postfix({short: f"{metrics[k]:.3g}" for short, k in _BAR_KEYS if k in metrics},
                                    refresh=False)
                    bar.update(1)
                if self.nonfinite_streak >= cfg.train.max_nonfinite:
                    self.save()
                    raise NonFiniteLoss(
                        f"{self.nonfinite_streak} steps in a row had a non-finite loss or gradient (last at step "
                        f"{step}); stopping. Lower train.lr, enable train.grad_clip, or check the rewards.")
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save()
                if self._stop_requested:
                    path = self.save()
                    log.warning("stopped at step %d; checkpoint %s (continue with --resume)", step, path)
                    raise KeyboardInterrupt
            if bar is not None:
                bar.close()
            after = self.evaluate()
            if self.history:  # the final evaluation is the law's last point, at the last step's entropy
                after.update(self._entropy_law({**after, "rollout/entropy": self.history[-1].get("rollout/entropy")}))
                after.update({k: v for k, v in self.history[-1].items() if k.startswith("budget/")})
            summary["after"] = after
            for s in sinks:
                s.write(self.step_idx, after)
            self.save()
            summary["export"] = str(self.export())
        finally:
            if main:
                signal.signal(signal.SIGINT, old_handler)
            for s in sinks:
                s.close()
            sample_log.close()
        summary["steps"] = self.step_idx
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


_BAR_KEYS = (("reward", "reward/mean"), ("acc", "accuracy"), ("entropy", "policy/entropy"),
             ("len", "response_length/mean"), ("s/step", "time/step_s"))


def _fmt(m: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _progress(cfg, start: int):
    if not cfg.log.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)
