"""The learner: trajectories -> packed tensors (forkrl.train.batch) -> log-probs and entropies
(forkrl.train.forward) -> PPO updates, on one process or as one rank of N (forkrl.train.parallel).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.algos import (
    ADVANTAGES,
    LOSSES,
    SELECTORS,
    TOKEN_SELECTORS,
    BatchContext,
    agg_loss,
    call,
    kl_penalty,
    per_turn_index,
)
from forkrl.algos.correction import (
    duration_weights,
    logprob_mismatch,
    rollout_correction_weights,
)
from forkrl.algos.entropy_losses import hapo_entropy_stats
from forkrl.algos.losses import AggNorm
from forkrl.algos.schedules import cosine_ramp
from forkrl.collect import derive_seed
from forkrl.models.adapters import active_adapter, adapter_names
from forkrl.train.batch import (  # noqa: F401  (re-exported: the learner's nouns, by their old address)
    PackedBatch,
    common_header,
    first_occurrence,
    micro_batches,
    pack,
    token_origin,
)
from forkrl.train.forward import (  # noqa: F401
    Header,
    PolicyForward,
    activation_bytes_per_token,
    entropy_change,
    entropy_change_metrics,
    entropy_change_states,
    pack_rows,
    resolve_autocast,
    response_log_softmax,
    response_logprobs,
)
from forkrl.train.parallel import DataParallel, grad_norm_value
from forkrl.train.replay import ReplayBuffer
from forkrl.types import PolicyFeedback, RolloutBatch, Trajectory

# a shorter header is run with each micro-batch: a separate forward and backward would cost more than it saves
HEADER_MIN_TOKENS = 32


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class MicroBatch:
    """What the loss terms read on one micro-batch: its rows, the policy's log-probs and entropies
    (with grad), the old and reference log-probs, advantages, the mini-batch's normalisers and the
    loss's batch statistics for these rows."""
    sub: PackedBatch
    logp: Tensor
    entropy: Tensor
    old: Tensor
    adv: Tensor
    norm: AggNorm
    stats: dict
    turn: Tensor
    progress: float
    replay: bool = False       # SPEAR's replayed rows: the policy term again, own normaliser and coefficient
    coef: float = 1.0
    ref_logp: Tensor | None = None
    value_norm: AggNorm | None = None  # the critic's normalisers: every generated token of the mini-batch
    row_weight: Tensor | None = None   # [b] per-row weight on the policy term (duration-aware updates)

    @property
    def mask(self) -> Tensor:
        return self.sub.train_mask


class Learner:
    """Turns scored trajectories into optimizer steps (PPO epochs x mini-batches x micro-batches).

    Stages, in order, on the packed batch: advantages (trajectories may carry a fixed one), sample
    selection, token selection, old/reference log-probs, the loss's batch statistics (`prepare`),
    then per micro-batch the loss, times rollout-correction weights, plus KL and entropy terms.
    Replay rows (self-imitation) form a second loss term with its own normaliser and coefficient.

    As one rank of N (`dp`, forkrl.train.parallel), it gathers the batch's trajectories from every
    rank, takes every statistic over the whole batch and trains its own rows; `forward` is then the
    FSDP-sharded `PolicyForward`, and `sampling_model` (the engine's full copy) gets the new weights
    after each update.
    """

    def __init__(self, model, optimizer, scheduler, cfg, *, ref_model=None, pad_id: int = 0,
                 temperature: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                 forward: PolicyForward | None = None, dp: DataParallel | None = None, sampling_model=None,
                 critic=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg = cfg  # RunConfig
        self.ref_model = ref_model
        self.pad_id = pad_id
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        a = cfg.algo
        self.advantage_fn = ADVANTAGES.get(a.advantage)
        self.loss_fn = LOSSES.get(a.loss)
        self.token_selector = TOKEN_SELECTORS.get(a.token_selector) if a.token_selector else None
        self.sample_selector = SELECTORS.get(a.sample_selector) if a.sample_selector else None
        self.dp = dp or DataParallel()
        # a given forward carries the run's autocast decision (the Trainer's, timed once); one is only
        # decided here for a Learner built on its own
        self.forward = forward or PolicyForward(model, temperature=temperature, chunk=cfg.train.logprob_chunk,
                                                autocast=resolve_autocast(cfg.train.bf16_autocast, model),
                                                attention=cfg.train.attention)
        self.autocast = self.forward.autocast
        self.ref_forward = (PolicyForward(ref_model, temperature=temperature, chunk=cfg.train.logprob_chunk,
                                          autocast=self.autocast, attention=cfg.train.attention)
                            if ref_model is not None else None)
        self.sampling_model = sampling_model
        self.critic = critic  # forkrl.train.critic.Critic (algo.critic), trained beside the policy
        self._critic_only = False  # a critic warm-up step: the policy's terms are left out
        # a one-token row for a rank with nothing to run while the others run a collective forward
        self._idle_batch = pack([Trajectory(prompt_ids=[pad_id], tokens=[pad_id], logprobs=[0.0], entropies=[0.0],
                                            loss_mask=[1], group="idle")], pad_id)
        mb = cfg.train.micro_batch_tokens
        self.micro_tokens = mb if mb != "auto" else max(64, int(
            cfg.train.activation_memory_gb * 2**30 / activation_bytes_per_token(
                model, cfg.train.gradient_checkpointing, self.autocast)))
        self.state: dict = {}  # the loss's state across steps (e.g. EPO's per-turn entropy history); checkpointed
        self.last_seq_adv: list[float] = []  # per input trajectory, its mean advantage (SPEAR's buffer reads it)
        self.replay = ReplayBuffer(a.replay) if a.replay.enabled else None
        self.feedback = PolicyFeedback()  # what the last update told the collector (checkpointed)

    # -- the loss terms of a micro-batch: each (value, metrics); the update sums them -------------------
    @property
    def loss_terms(self) -> list:
        a = self.cfg.algo
        policy = [] if self._critic_only else (
            [self.policy_term] + ([self.kl_term] if self.ref_forward is not None else [])
            + ([self.entropy_term] if a.entropy_coef else []))
        return policy + ([self.value_term] if self.critic is not None else [])

    def policy_term(self, mb: MicroBatch) -> tuple[Tensor, dict]:
        """The recipe's policy loss (algo.loss), times rollout-correction weights; on replayed rows,
        times SPEAR's ramped coefficient, its metrics under replay/."""
        a = self.cfg.algo
        metrics, weight = {}, None
        if a.rollout_correction.mode != "none":
            rc = a.rollout_correction
            weight, metrics = rollout_correction_weights(mb.old, mb.sub.sampling_logp, mb.mask, mode=rc.mode,
                                                         cap=rc.cap, low=rc.low)
        if mb.row_weight is not None:
            rows = mb.row_weight.unsqueeze(-1).expand_as(mb.adv)
            weight = rows if weight is None else weight * rows
        available = {"entropy": mb.entropy, "agg": a.agg, "norm": mb.norm, "weight": weight, "stats": mb.stats,
                     "turn": mb.turn, "progress": mb.progress, "words": mb.sub.words}
        loss, m = call(self.loss_fn, mb.logp, mb.old, mb.adv, mb.mask, available=available, params=a.loss_params)
        metrics.update({("replay/" if mb.replay else "") + k: v for k, v in m.items()})
        return mb.coef * loss, metrics

    def kl_term(self, mb: MicroBatch) -> tuple[Tensor, dict]:
        """algo.kl_coef x KL(policy || reference) by algo.kl_estimator, aggregated like the loss."""
        a = self.cfg.algo
        kl = kl_penalty(mb.logp, mb.ref_logp, a.kl_estimator)
        mean = float((kl.detach() * mb.mask).sum() / mb.mask.sum().clamp(min=1))
        return a.kl_coef * agg_loss(kl, mb.mask, a.agg, mb.norm), {"kl": mean}

    def value_term(self, mb: MicroBatch) -> tuple[Tensor, dict]:
        """The critic's clipped value loss on the micro-batch's generated tokens (its own parameters:
        summed with the policy's terms, it changes no policy gradient). Replayed rows do not train it."""
        if mb.replay:
            return torch.zeros(()), {}
        return self.critic.loss(mb.sub, mb.value_norm, self.cfg.algo.agg)

    def entropy_term(self, mb: MicroBatch) -> tuple[Tensor, dict]:
        """-algo.entropy_coef x the policy's entropy, aggregated like the loss (a bonus when positive)."""
        a = self.cfg.algo
        return -a.entropy_coef * agg_loss(mb.entropy, mb.mask, a.agg, mb.norm), {}

    def _adapter_of(self, sub: PackedBatch) -> contextlib.ExitStack:
        """The micro-batch's LoRA adapter active in the policy (and the critic's value model)."""
        stack = contextlib.ExitStack()
        name = sub.adapter_of()
        if name is not None:
            stack.enter_context(active_adapter(self.model, name))
            if self.critic is not None:
                stack.enter_context(active_adapter(self.critic.forward.model, name))
        return stack

    # -- one update from a rollout batch, and what the collector learns from it --------------------
    def learn(self, batch: RolloutBatch, step: int) -> tuple[dict[str, float], PolicyFeedback]:
        """One update on `batch.trajectories` (plus SPEAR's replayed rows), then the feedback for the
        next collection: the policy entropy it measured and, for HAPO's adaptive temperature, the
        log-entropy statistics of the tokens it trained on (algorithms.md §7 step 1, §13.3)."""
        trajs = batch.trajectories
        metrics: dict = {}
        replay_coef, replayed = 1.0, []
        if self.replay is not None:
            replayed, replay_stats = self.replay.sample(step, derive_seed(self.seed, step, 991))
            metrics.update(replay_stats)
            replay_coef = cosine_ramp(step, self.cfg.algo.replay.warmup_steps, self.cfg.algo.replay.loss_coef)
        # every rank's rows, in rank order: statistics over the whole batch, on every rank
        everyone = self.dp.gather(trajs + replayed)
        if self.dp.distributed:  # a group is one rank's; a name two ranks gave their own groups is told apart
            ranks_of: dict[str, set[int]] = {}
            for r, part in enumerate(everyone):
                for t in part:
                    ranks_of.setdefault(t.group, set()).add(r)
            for r, part in enumerate(everyone):
                for t in part:
                    if len(ranks_of[t.group]) > 1:
                        t.group = f"rank{r}/{t.group}"
        flat = [t for part in everyone for t in part]
        if not flat:
            return metrics, self.feedback
        owner = [r for r, part in enumerate(everyone) for _ in part] if self.dp.distributed else None
        metrics.update(self.update(flat, step, replay_coef=replay_coef, owner=owner))
        if self.replay is not None:
            offset = sum(len(part) for part in everyone[:self.dp.rank])
            added = self.replay.add(step, trajs, self.last_seq_adv[offset:offset + len(trajs)])
            metrics["replay/added"] = float(sum(self.dp.gather(added)))
        if self.sampling_model is not None:  # the engine samples from full weights: hand it the new ones
            start = time.perf_counter()
            self.sync_sampling_weights()
            metrics["time/weight_gather_s"] = time.perf_counter() - start
        fb = dataclasses.replace(self.feedback)
        if "policy/entropy" in metrics:
            fb.policy_entropy = float(metrics["policy/entropy"])
        at = self.cfg.rollout.adaptive_temperature
        if at.enabled:
            ent = [e for t in flat if t.source == "policy" for e, m in zip(t.entropies, t.loss_mask) if m]
            if ent:
                x = torch.tensor(ent)
                fb.entropy_stats = hapo_entropy_stats(x, torch.ones_like(x), at.pivot)
                metrics["rollout/adaptive_temperature"] = 1.0
        self.feedback = fb
        return metrics, fb

    def sync_sampling_weights(self) -> None:
        """Gather the sharded policy's full weights into the engine's copy (collective; a no-op in
        one process, where the engine samples from the policy itself)."""
        if self.sampling_model is None:
            return
        full = self.dp.full_state_dict(self.forward)
        self.sampling_model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})

    def state_dict(self) -> dict:
        return {"loss": self.state, "replay": self.replay.state_dict() if self.replay is not None else None,
                "feedback": dataclasses.asdict(self.feedback),
                "critic": self.critic.state_dict() if self.critic is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["loss"]
        if self.replay is not None and state.get("replay"):
            self.replay.load_state_dict(state["replay"])
        self.feedback = PolicyFeedback(**state["feedback"])
        if self.critic is not None and state.get("critic"):
            self.critic.load_state_dict(state["critic"])

    @torch.no_grad()
    def _no_grad_logprobs(self, forward: PolicyForward, batch: PackedBatch, collective: bool = True) -> Tensor:
        """Log-probs of every row of `batch` under `forward` without grad: this rank computes its own
        rows, the ranks sum their parts. `collective`: `forward` is sharded (every rank runs as many
        forwards as the busiest)."""
        full = torch.zeros_like(batch.sampling_logp)
        header, micros = self._micro_plan(forward, batch, batch.rows_of(self.dp.rank), with_grad=False)
        for idx in self.dp.pad_count(micros) if collective else micros:
            if idx is None:
                forward(self._idle_batch)
                continue
            lp, _ = forward(batch.select(idx), header=header)
            full[idx, :lp.shape[1]] = lp.float().cpu()
        return self.dp.sum(full)

    def _micro_plan(self, forward: PolicyForward, batch: PackedBatch, rows: Tensor, with_grad: bool
                    ) -> tuple[Header | None, list[Tensor]]:
        """The micro-batches of `rows`, and the header they all start with, already run, when running
        it once for all of them pays (`forward.Header`; else None): span attention, one process (a
        sharded forward's collectives expect the same forwards on every rank), no LoRA adapters, at
        least `HEADER_MIN_TOKENS` tokens, more than one micro-batch. With grad, the header's
        activations live through every micro-batch, so they come out of each one's token budget."""
        t = self.cfg.train
        if forward.spans and not self.dp.distributed and batch.adapter is None:
            ids = common_header(batch, rows)
            if len(ids) >= HEADER_MIN_TOKENS:
                budget = max(64, self.micro_tokens - len(ids)) if with_grad else self.micro_tokens
                micros = micro_batches(batch, rows, t.micro_batch_size, budget, True, len(ids))
                if len(micros) > 1:
                    return forward.run_header(ids), micros
        return None, micro_batches(batch, rows, t.micro_batch_size, self.micro_tokens, forward.spans)

    def _idle(self, backward: bool = False) -> None:
        """A forward (and backward) of one token with zero loss: FSDP's collectives need every rank."""
        logp, _ = self.forward(self._idle_batch)
        if backward:
            (logp.sum() * 0.0).backward()

    def _probe_distributions(self, probe: PackedBatch | None) -> Tensor | None:
        """This rank's part of the entropy probe: full next-token log-distributions of its rows."""
        if probe is None:
            return None
        mine = probe.rows_of(self.dp.rank)
        if len(mine) == 0:
            self._idle()
            return None
        # one forward, or one per LoRA adapter (the order is the same before and after the update)
        parts = micro_batches(probe, mine, len(mine), 2**62)
        return torch.cat([response_log_softmax(self.forward, probe.select(idx)).cpu() for idx in parts])

    def _entropy_probe(self, batch: PackedBatch, gen: torch.Generator) -> PackedBatch | None:
        """A few random policy rows, cut to log.entropy_probe_tokens trained tokens, whose full
        next-token distributions are kept before and after the update (`entropy_change`)."""
        budget = self.cfg.log.entropy_probe_tokens
        rows = (~batch.replay).nonzero().flatten()
        if budget == 0 or len(rows) == 0:
            return None
        rows = rows[torch.randperm(len(rows), generator=gen)]
        counts = (batch.train_mask[rows] > 0).sum(-1)
        keep = rows[(counts.cumsum(0) - counts) < budget]
        probe = batch.select(keep)
        flat = (probe.train_mask > 0).flatten()
        flat &= flat.cumsum(0) <= budget
        probe.loss_mask = flat.view_as(probe.train_mask).to(probe.loss_mask.dtype)
        return probe if flat.any() else None

    def progress(self, step: int) -> float:
        return (step - 1) / max(self.cfg.train.steps, 1)

    def advantages(self, batch: PackedBatch, progress: float, step: int = 1) -> tuple[PackedBatch, Tensor, dict]:
        """Advantages, then sample selection (which may drop rows) and token selection."""
        a = self.cfg.algo
        adv, metrics = call(self.advantage_fn, batch.rewards, batch.group_ids, batch.loss_mask,
                            available={"entropy": batch.sampling_entropy, "origin": batch.token_origin,
                                       "sampling_logp": batch.sampling_logp,
                                       "values": batch.old_values, "returns": batch.returns,
                                       "steps": batch.episode_steps, "value_mask": batch.value_mask},
                            params=a.advantage_params)
        fixed = ~torch.isnan(batch.fixed_adv)
        if fixed.any():
            adv = torch.where(fixed.unsqueeze(-1), batch.fixed_adv.unsqueeze(-1) * batch.loss_mask, adv)
        seq_adv = (adv * batch.loss_mask).sum(-1) / batch.loss_mask.sum(-1).clamp(min=1)
        self.last_seq_adv = seq_adv.tolist()
        if batch.stats_only.any():
            # rows that only shaped their group's statistics (replaced by Arbitrary-Entropy PO samples)
            idx = (~batch.stats_only).nonzero().flatten()
            batch, adv, seq_adv = batch.select(idx), adv[idx], seq_adv[idx]
            adv = adv[:, :batch.resp_ids.shape[1]]
        if self.sample_selector is not None:
            keep = call(self.sample_selector, seq_adv, batch.group_ids,
                        available={"progress": progress, "adapter": batch.adapter, "step": step},
                        params=a.sample_selector_params)
            keep = keep | batch.replay  # replayed rows are chosen by the replay buffer, not here
            metrics["train/selected_sample_frac"] = float(keep.float().mean())
            idx = keep.nonzero().flatten()
            batch = batch.select(idx)
            adv = adv[idx, :batch.resp_ids.shape[1]]
        if self.token_selector is not None:
            # selection over the whole rollout batch, on the sampling-time entropies: the entropies of
            # the policy before this update (what the training forward of the first update computes)
            keep = call(self.token_selector, batch.sampling_entropy, batch.loss_mask,
                        available={"adv": adv, "progress": progress, "step": step, "origin": batch.token_origin},
                        params=a.token_selector_params)
            batch.train_mask = batch.loss_mask * keep.to(batch.loss_mask.dtype)
        if a.train_shared_prefix_once and batch.token_origin is not None:
            first = first_occurrence(batch.token_origin)
            metrics["tree/deduplicated_tokens"] = float((batch.train_mask * (~first)).sum())
            batch.train_mask = batch.train_mask * first.to(batch.train_mask.dtype)
        return batch, adv, metrics

    def update(self, trajectories: list[Trajectory], step: int, replay_coef: float = 1.0,
               owner: list[int] | None = None) -> dict[str, float]:
        """One update on the batch `trajectories` (every rank's, in rank order; `owner`: the rank that
        trains each, None for one process)."""
        t, a = self.cfg.train, self.cfg.algo
        rank = self.dp.rank
        progress = self.progress(step)
        # one canonical order, by group (stable within it): which rank holds which group, and in which
        # order the ranks arrive, changes nothing, not even the methods' random choices
        order = sorted(range(len(trajectories)), key=lambda i: trajectories[i].group)
        # rows' adapters numbered in the model's order (agent_by_agent reads them as the profile order)
        batch = pack([trajectories[i] for i in order], self.pad_id, adapter_order=adapter_names(self.model) or None)
        counted = (self.forward.tokens_run, self.forward.tokens_shared)
        if owner is not None:
            batch.owner = torch.tensor([owner[i] for i in order], dtype=torch.long)
        critic_metrics: dict = {}
        self._critic_only = self.critic is not None and self.critic.warming_up(step)
        if self.critic is not None:
            batch, critic_metrics = self.critic.annotate(batch, t.micro_batch_size, self.micro_tokens)
        batch, adv, adv_metrics = self.advantages(batch, progress, step)
        seq_adv = [0.0] * len(order)
        for row, i in enumerate(order):
            seq_adv[i] = self.last_seq_adv[row]
        self.last_seq_adv = seq_adv  # in the caller's order (SPEAR's buffer reads it)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        row_weight = None
        if a.duration_weight != "off":
            row_weight, duration_metrics = duration_weights(batch.seconds, mode=a.duration_weight)
            adv_metrics.update(duration_metrics)
        updates_per_batch = t.epochs * t.mini_batches
        if t.old_logprobs == "sampling":
            old_logp = batch.sampling_logp
        elif updates_per_batch > 1:
            old_logp = self._no_grad_logprobs(self.forward, batch)
        else:
            old_logp = None  # one update: the policy before it is the policy in its own forward
        ref_logp = (self._no_grad_logprobs(self.ref_forward, batch, collective=False)  # the reference is not sharded
                    if a.kl_coef > 0 else None)
        turn = per_turn_index(batch.loss_mask)
        # its own generator: turning the probe on or off must not move the methods' random choices
        probe = self._entropy_probe(batch, torch.Generator().manual_seed(self.seed * 1_000_003 + step + 17))
        probe_before = self._probe_distributions(probe)

        stats: dict = {}
        prepare = LOSSES.hook(a.loss, "prepare")
        if prepare is not None:
            ctx = BatchContext(old_logp=batch.sampling_logp if old_logp is None else old_logp, adv=adv,
                               mask=batch.train_mask, entropy=batch.sampling_entropy, turn=turn, progress=progress,
                               state=self.state, generator=gen)
            stats, self.state = prepare(ctx, **a.loss_params)
        B = len(batch)

        def rows(value, micro, L):
            return value[micro, :L] if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] == B else value

        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        loss_total, n_minis = 0.0, 0  # the loss: summed over micro-batches and ranks, averaged over mini-batches
        # sampler vs learner on the tokens the learner sees before this update's first optimizer step
        mismatch = {"sum": 0.0, "count_above_2": 0.0, "max": 1.0, "tokens": 0.0}

        def add(name, value, w=1.0):
            sums[name] = sums.get(name, 0.0) + float(value) * w
            weights[name] = weights.get(name, 0.0) + w

        n_skipped, n_kl_skipped = 0, 0
        grad_norms, critic_norms = [], []
        for _epoch in range(t.epochs):
            order = torch.randperm(B, generator=gen) if updates_per_batch > 1 else torch.arange(B)
            for mini in torch.tensor_split(order, t.mini_batches):
                if len(mini) == 0:
                    continue
                finite, mini_loss = True, 0.0
                kl_sum, kl_tokens = 0.0, 0.0  # the approximate KL of the policy from the old one, this mini-batch
                # on-policy rows and replayed rows are two loss terms, each normalised over its own tokens
                for is_replay in (False, True):
                    part = mini[batch.replay[mini] == is_replay]
                    if len(part) == 0:
                        continue
                    coef = replay_coef if is_replay else 1.0
                    # normalisers over the whole mini-batch (every rank's rows): the ranks' gradients then sum
                    norm = AggNorm(tokens=float(batch.train_mask[part].sum().clamp(min=1)), seqs=float(len(part)),
                                   const=float(a.agg_const or self.max_new_tokens))
                    read = batch.value_mask if batch.value_mask is not None else batch.loss_mask
                    value_norm = dataclasses.replace(norm, tokens=float(read[part].sum().clamp(min=1)))
                    mine = part if batch.owner is None else part[batch.owner[part] == rank]
                    # the header's keys and values once; each micro-batch's backward sums their gradients
                    header, micros = self._micro_plan(self.forward, batch, mine, with_grad=True)
                    for micro in self.dp.pad_count(micros):
                        if micro is None:
                            self._idle(backward=True)
                            continue
                        sub = batch.select(micro)
                        L = sub.resp_ids.shape[1]
                        logp, entropy = self.forward(sub, header=header)
                        logp, entropy = logp.cpu(), entropy.cpu()
                        mb = MicroBatch(sub=sub, logp=logp, entropy=entropy,
                                        old=logp.detach() if old_logp is None else old_logp[micro, :L],
                                        adv=adv[micro, :L], norm=norm, stats={k: rows(v, micro, L) for k, v in stats.items()},
                                        turn=turn[micro, :L], progress=progress, replay=is_replay, coef=coef,
                                        ref_logp=None if ref_logp is None else ref_logp[micro, :L],
                                        value_norm=value_norm,
                                        row_weight=None if row_weight is None else row_weight[micro])
                        ntok = float(sub.train_mask.sum())
                        if n_minis == 0 and not is_replay:
                            part_mm = logprob_mismatch(logp, sub.sampling_logp, sub.train_mask)
                            for k in ("sum", "count_above_2", "tokens"):
                                mismatch[k] += part_mm[k]
                            mismatch["max"] = max(mismatch["max"], part_mm["max"])
                        loss = 0.0
                        for term in self.loss_terms:  # policy, KL, entropy: summed, each with its own metrics
                            value, m = term(mb)
                            loss = loss + value
                            for k, v in m.items():
                                add(k, v, ntok)
                        generated = sub.loss_mask  # every generated token, selected for the loss or not
                        if not is_replay and a.max_approx_kl is not None:
                            log_ratio = (logp.detach() - mb.old).clamp(-20, 20) * mb.mask
                            kl_sum += float(((log_ratio.exp() - 1 - log_ratio) * mb.mask).sum())
                            kl_tokens += float(mb.mask.sum())
                        if not is_replay:
                            add("policy/entropy",
                                float((entropy.detach() * generated).sum() / generated.sum().clamp(min=1)),
                                float(generated.sum()))
                        mini_loss += float(loss.detach())  # micro losses carry mini-batch normalisers: they sum
                        finite = finite and bool(torch.isfinite(loss))
                        # backward even when non-finite: every rank must take part in FSDP's reduce-scatter;
                        # the non-finite gradient then skips the step on every rank alike. Under the rows'
                        # adapter: gradient checkpointing runs their layers again
                        with self._adapter_of(sub):
                            loss.backward()
                    if header is not None:
                        header.backward()
                loss_total, n_minis = loss_total + mini_loss, n_minis + 1
                params = [p for p in self.model.parameters() if p.requires_grad]
                gn = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip else float("inf")))
                finite = bool(self.dp.sum(torch.tensor([0.0 if finite else 1.0])) == 0) and math.isfinite(gn)
                if self.critic is not None:
                    critic_norms.append(self.critic.step())
                too_far = False
                if a.max_approx_kl is not None:  # every rank's tokens: all ranks skip alike
                    kl = self.dp.sum(torch.tensor([kl_sum, kl_tokens], dtype=torch.float64))
                    too_far = float(kl[0] / kl[1].clamp(min=1)) > a.max_approx_kl
                if self._critic_only:
                    pass  # the critic's warm-up: the policy keeps its weights and its schedule
                elif too_far:
                    n_kl_skipped += 1  # MARFT's guard: a policy already this far from the old one does not step
                elif finite:
                    grad_norms.append(gn)
                    self.optimizer.step()
                else:
                    n_skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
        if not self._critic_only:
            with warnings.catch_warnings():
                # the schedule follows the update count, so an update whose steps were all skipped
                # (non-finite, or past max_approx_kl) still advances it; torch warns about exactly that
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                        category=UserWarning)
                self.scheduler.step()
        # every rank's sums: weighted means over the whole batch
        for r, (part_sums, part_weights, part_loss, part_mm) in enumerate(
                self.dp.gather((sums, weights, loss_total, mismatch))):
            if r == self.dp.rank:
                continue
            for k, v in part_sums.items():
                sums[k] = sums.get(k, 0.0) + v
                weights[k] = weights.get(k, 0.0) + part_weights[k]
            loss_total += part_loss
            for k in ("sum", "count_above_2", "tokens"):
                mismatch[k] += part_mm[k]
            mismatch["max"] = max(mismatch["max"], part_mm["max"])
        metrics = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        metrics["loss"] = loss_total / max(n_minis, 1)
        if mismatch["tokens"]:
            metrics["train/logprob_mismatch"] = mismatch["sum"] / mismatch["tokens"]
            metrics["train/logprob_mismatch_max"] = mismatch["max"]
            metrics["train/logprob_mismatch_frac_above_2"] = mismatch["count_above_2"] / mismatch["tokens"]
        probe_after = self._probe_distributions(probe)
        states = entropy_change_states(probe_before, probe_after) if probe_before is not None else None
        if probe is not None:  # every rank's probed states, in row order
            parts = [x for x in self.dp.gather(states) if x is not None]
            if parts:
                metrics.update(entropy_change_metrics(torch.cat([m for m, _ in parts]), torch.cat([p for _, p in parts])))
        metrics.update(adv_metrics)
        if self.critic is not None:
            metrics.update(critic_metrics)
            metrics["critic/grad_norm"] = sum(critic_norms) / len(critic_norms) if critic_norms else math.nan
            metrics["critic/lr"] = self.critic.optimizer.param_groups[0]["lr"]
            metrics["critic/warmup"] = float(self._critic_only)
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/sequences"] = float(batch.resp_ids.shape[0])
        metrics["train/tokens"] = float(batch.train_mask.sum())
        metrics["train/selected_token_frac"] = float(batch.train_mask.sum() / batch.loss_mask.sum().clamp(min=1))
        metrics["train/nonfinite_updates"] = float(n_skipped)
        if a.max_approx_kl is not None:
            metrics["train/kl_skipped_updates"] = float(n_kl_skipped)
        # the forwards' work in tokens (old log-probs and every epoch's micro-batches, all ranks): tokens
        # run, and tree-branch tokens read from their parent's columns instead of run again
        work = self.dp.sum(torch.tensor([self.forward.tokens_run - counted[0], self.forward.tokens_shared - counted[1]],
                                        dtype=torch.float64))
        metrics["learner/forward_tokens"], metrics["learner/shared_prefix_tokens"] = float(work[0]), float(work[1])
        # Cov(log pi, A) over the trained tokens of the batch, at the policy the update started from: the
        # quantity whose sign says whether policy gradient lowers entropy (algorithms.md §4)
        m = batch.train_mask > 0
        if m.any():
            lp = (batch.sampling_logp if old_logp is None else old_logp)[m].double()
            av = adv[m].double()
            metrics["entropy/cov_logp_adv"] = float(((lp - lp.mean()) * (av - av.mean())).mean())
        if batch.replay.any():
            metrics["replay/rows"] = float(batch.replay.sum())
            metrics["replay/coef"] = replay_coef
        return metrics
