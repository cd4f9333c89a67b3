"""Decoupled mode: rollout workers and one learner as Ray actors, with bounded staleness.

    driver ── DecoupledRun ──▶ LearnerActor: the Loop, its batch source is RayRollouts
                                   │  rollout() / set_weights(ref)       ▲ RolloutBatch (object store)
                                   ▼                                      │
                              RolloutWorker × N: Collector.next_batch() ─┘
                                   │ take(k)
                              PromptLedger: which data positions are where

Policy versions. Version V is the policy after V updates; every generated token records the version
that sampled it (`Trajectory.policy_version`). The update that makes version V+1 may train a token of
version v only if V − v ≤ `max_staleness` (AsyncFlow's bound, algorithms.md §17; 0 = synchronous).
Two rules keep it: a worker holding version V is only given work for updates up to V+1+max_staleness
(so with 1, workers sample the next batch while the learner trains this one), and at training time
any group beyond the bound (APRIL's carried-over tokens can be) is dropped or its prompt re-queued
(`distributed.stale`). `algo.rollout_correction` (token TIS, §16) corrects what remains off-policy.

Exactly once. Workers take data positions from the `PromptLedger`, which knows which worker holds
which. When a worker dies, Ray restarts it and the ledger puts its undelivered positions back at the
front of the queue; positions the learner has received are not re-queued. The learner marks
positions trained after each update, and its checkpoints carry the ledger, so a resumed job samples
every untrained position again and no trained one.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict, deque

import torch

from forkrl.collect import Collector, build_env
from forkrl.config import RunConfig
from forkrl.distributed import require_ray
from forkrl.models import load_policy
from forkrl.rollout import build_engine
from forkrl.tasks import build_task
from forkrl.train.checkpoint import load_trainable_state, trainable_state
from forkrl.train.trainer import Trainer, seed_everything
from forkrl.types import PolicyFeedback, RolloutBatch

log = logging.getLogger("forkrl")


def _positions(trajs) -> list[int]:
    return list(dict.fromkeys(t.sample.position for t in trajs
                              if t.sample is not None and t.sample.position is not None))


class PromptLedger:
    """The training stream's data positions: handed out, held by workers, delivered, trained."""

    def __init__(self):
        self.next = 0
        self.requeued: deque[int] = deque()
        self.held: dict[int, set[int]] = defaultdict(set)   # worker -> positions it took, not yet delivered
        self.delivered: set[int] = set()                    # at the learner, not yet trained
        self.trained: list[int] = []
        self.lost: list[int] = []                           # re-queued after a worker failure

    def take(self, worker: int, k: int) -> list[int]:
        out = [self.requeued.popleft() for _ in range(min(k, len(self.requeued)))]
        fresh = k - len(out)
        out += range(self.next, self.next + fresh)
        self.next += fresh
        self.held[worker].update(out)
        return out

    def deliver(self, worker: int, positions: list[int]) -> None:
        self.held[worker].difference_update(positions)
        self.delivered.update(positions)

    def release(self, worker: int) -> list[int]:
        """A worker died: what it held goes back to the front of the queue."""
        lost = sorted(self.held.pop(worker, set()))
        self.requeued.extendleft(reversed(lost))
        self.lost += lost
        return lost

    def finish(self, trained: list[int], dropped: list[int], requeue: list[int]) -> None:
        self.delivered.difference_update(trained + dropped + requeue)
        self.trained += trained
        self.requeued.extend(requeue)

    def state(self) -> dict:
        """Resumable: positions not trained (queued, held, delivered) come back first."""
        pending = list(self.requeued) + sorted({p for s in self.held.values() for p in s} | self.delivered)
        return {"next": self.next, "pending": pending, "trained": list(self.trained)}

    def load(self, state: dict) -> None:
        self.next, self.requeued = state["next"], deque(state["pending"])
        self.held, self.delivered, self.trained = defaultdict(set), set(), list(state["trained"])

    def report(self) -> dict:
        return {"next": self.next, "trained": list(self.trained), "requeued": list(self.requeued),
                "held": {w: sorted(s) for w, s in self.held.items() if s}, "lost": list(self.lost)}


def _threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


class LedgerPositions:
    """A rollout worker's data-position source: positions come from the shared `PromptLedger`, which
    the learner checkpoints (so this source has no state of its own)."""

    def __init__(self, ledger, worker_id: int):
        self.ray, self.ledger, self.worker_id = require_ray(), ledger, worker_id

    def take(self, k: int) -> list[int]:
        return self.ray.get(self.ledger.take.remote(self.worker_id, k))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RolloutWorker:
    """A `Collector` (engine + sampler + env + task) on the weights the learner last sent: no optimizer,
    no learner, no reference model."""

    def __init__(self, cfg: dict, worker_id: int, ledger, unit_groups: int):
        rc = RunConfig.model_validate(cfg)
        _threads(rc.distributed.worker_cpus)
        rc.rollout.prompts_per_step = unit_groups
        self.delay = rc.distributed.simulated_token_delay_s
        seed_everything(rc.seed)
        self.model, tokenizer = load_policy(rc.model.name, dtype=rc.model.dtype, lora=rc.model.lora, seed=rc.seed,
                                           adapters=rc.model.adapters)
        engine = build_engine(rc.rollout, self.model, tokenizer, seed=rc.seed)
        env = build_env(rc, self.model, tokenizer, seed_of_call=lambda: self.collector.version)
        self.collector = Collector(rc, task=build_task(rc.task, seed=rc.seed), engine=engine, tokenizer=tokenizer,
                                   env=env, positions=LedgerPositions(ledger, worker_id))
        self.worker_id = worker_id

    def set_weights(self, payload: tuple) -> int:
        version, weights, feedback = payload
        load_trainable_state(self.model, weights, source="learner weights")
        self.collector.set_policy(version, feedback)  # stamped on the tokens it samples next
        return version

    def rollout(self, unit: int) -> RolloutBatch:
        self.collector.seed_salt = unit + 1  # each unit of work draws its own samples
        start = time.perf_counter()
        batch = self.collector.next_batch(self.collector.version + 1)
        if self.delay:  # slow generation, simulated (bench/async.py)
            time.sleep(self.delay * batch.decoded_tokens)
        batch.metrics["time/sampling_s"] = time.perf_counter() - start - batch.metrics["time/scoring_s"]
        return batch

    def pid(self) -> int:
        return os.getpid()


class RayRollouts:
    """The learner's batch source in a decoupled run: the same interface as the `Collector`
    (`next_batch`, `set_policy`, `state_dict`, `load_state_dict`), served by the rollout workers.
    `policy_weights()` returns the learner's current trainable weights, published with each version."""

    def __init__(self, cfg: RunConfig, ledger, workers: list, policy_weights):
        d = cfg.distributed
        self.ray = require_ray()
        self.ledger, self.workers = ledger, list(workers)
        self.max_staleness, self.stale, self.max_restarts = d.max_staleness, d.stale, d.max_restarts
        groups = cfg.rollout.prompts_per_step
        self.unit_groups = math.ceil(groups / len(self.workers))
        self.units_per_update = math.ceil(groups / self.unit_groups)
        self.sent = [None] * len(self.workers)     # weights version last sent to each worker
        self.failures = [0] * len(self.workers)
        self.busy: dict = {}                       # ObjectRef -> (worker, target update)
        self.probes: dict = {}                     # ObjectRef -> worker being restarted by Ray
        self.done: dict[int, list[RolloutBatch]] = defaultdict(list)
        self.quota: dict[int, int] = defaultdict(int)
        self.weights_ref, self.weights_version = None, None
        self.policy_weights = policy_weights
        self.version, self.feedback = 0, PolicyFeedback()
        self.units = 0
        self.version_log: list[dict] = []

    # -- the source interface ---------------------------------------------------------------------
    def set_policy(self, version: int, feedback: PolicyFeedback) -> None:
        self.version, self.feedback = version, feedback

    def state_dict(self) -> dict:
        return {"ledger": self.ray.get(self.ledger.state.remote())}

    def load_state_dict(self, state: dict) -> None:
        self.ray.get(self.ledger.load.remote(state["ledger"]))

    def _publish(self) -> None:
        if self.weights_version == self.version:
            return
        self.weights_ref = self.ray.put((self.version, self.policy_weights(), self.feedback))
        self.weights_version = self.version

    def _usable(self, i: int) -> bool:
        return self.failures[i] <= self.max_restarts and i not in self.probes.values()

    def _dispatch(self, version: int) -> None:
        running = {w for w, _ in self.busy.values()}
        for i, worker in enumerate(self.workers):
            if i in running or not self._usable(i):
                continue
            target = next((t for t in range(version + 1, version + 2 + self.max_staleness)
                           if self.quota[t] < self.units_per_update), None)
            if target is None:
                return
            if self.sent[i] != self.weights_version:
                worker.set_weights.remote(self.weights_ref)  # runs before the rollout: one actor, in order
                self.sent[i] = self.weights_version
            self.busy[worker.rollout.remote(self.units)] = (i, target)
            self.units += 1
            self.quota[target] += 1

    def _failed(self, i: int, target: int, err: Exception) -> None:
        """A unit was lost with its worker: re-queue what the worker held; probe it until Ray has
        restarted it (calls meanwhile fail with ActorUnavailableError), or give up when it is dead."""
        self.quota[target] -= 1
        if i in self.probes.values():  # already known to be down: this unit was sent before we knew
            return
        self.sent[i] = None  # restarted with its initial weights
        lost = self.ray.get(self.ledger.release.remote(i))
        self.failures[i] += 1
        usable = self.failures[i] <= self.max_restarts
        log.warning("rollout worker %d failed (%s); %d prompts re-queued; %s", i, type(err).__name__, len(lost),
                    "waiting for Ray to restart it" if usable else "giving up on it")
        if usable:
            self.probes[self.workers[i].pid.remote()] = i

    def _probed(self, ref) -> None:
        i = self.probes.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)  # still restarting
            self.probes[self.workers[i].pid.remote()] = i
        except self.ray.exceptions.RayActorError:
            self.failures[i] = self.max_restarts + 1
            log.warning("rollout worker %d did not come back; giving up on it", i)

    def next_batch(self, step: int) -> RolloutBatch:
        version = step - 1
        self._publish()
        wait0 = time.perf_counter()
        while len(self.done[version + 1]) < self.units_per_update:
            self._dispatch(version)
            if not self.busy and not self.probes:
                raise RuntimeError(f"no rollout worker left (each failed more than distributed.max_restarts="
                                   f"{self.max_restarts} times)")
            (ref,), _ = self.ray.wait(list(self.busy) + list(self.probes), num_returns=1)
            if ref in self.probes:
                self._probed(ref)
                continue
            i, target = self.busy.pop(ref)
            try:
                part = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as err:
                self._failed(i, target, err)
                continue
            self.ray.get(self.ledger.deliver.remote(i, _positions(part.generated + part.trajectories)))
            self.done[target].append(part)
        waited = time.perf_counter() - wait0
        self._dispatch(version)  # idle workers start on the next update while the learner trains
        self.quota.pop(version + 1, None)
        batch = RolloutBatch.merge(self.done.pop(version + 1))
        return self._bound_staleness(batch, version, waited)

    def _bound_staleness(self, batch: RolloutBatch, version: int, waited: float) -> RolloutBatch:
        lag = lambda t: version - min((v for v, m in zip(t.policy_version, t.loss_mask) if m), default=version)
        too_old = {t.group for t in batch.trajectories if lag(t) > self.max_staleness}
        kept = [t for t in batch.trajectories if t.group not in too_old]
        stale_pos = _positions([t for t in batch.trajectories if t.group in too_old])
        trained = _positions(kept)
        accounted = set(trained) | set(stale_pos)
        filtered = [p for p in _positions(batch.generated) if p not in accounted]  # e.g. by dynamic sampling
        requeue = stale_pos if self.stale == "requeue" else []
        self.ray.get(self.ledger.finish.remote(trained, filtered + ([] if requeue else stale_pos), requeue))
        lags = [version - v for t in kept for v, m in zip(t.policy_version, t.loss_mask) if m]
        versions = sorted({v for t in kept for v, m in zip(t.policy_version, t.loss_mask) if m})
        self.version_log.append({"update": version + 1, "token_versions": versions, "positions": trained})
        batch.trajectories = kept
        batch.metrics.update({
            "staleness/mean": sum(lags) / max(len(lags), 1), "staleness/max": float(max(lags, default=0)),
            "staleness/stale_groups": float(len(too_old)), "async/wait_s": waited,
            "async/workers_alive": float(sum(self._usable(i) for i in range(len(self.workers)))),
            "async/worker_failures": float(sum(self.failures))})
        return batch


class LearnerActor:
    """The ordinary run (`Trainer`: learner, evaluation, sinks, checkpoints) fed by the rollout workers."""

    def __init__(self, cfg: dict, ledger, workers: list):
        rc = RunConfig.model_validate(cfg)
        _threads(rc.distributed.learner_cpus)
        rc.log.progress = False  # a bar redrawn with \r does not travel through Ray's log lines: one line per step instead
        seed_everything(rc.seed)
        model, tokenizer = load_policy(rc.model.name, dtype=rc.model.dtype, lora=rc.model.lora, seed=rc.seed,
                                           adapters=rc.model.adapters)
        self.rollouts = RayRollouts(rc, ledger, workers, policy_weights=lambda: trainable_state(model))
        self.trainer = Trainer(rc, model=model, tokenizer=tokenizer, source=self.rollouts)
        self.trainer.loop.on_step.append(_log_step)

    def train(self, resume: bool = False) -> dict:
        summary = self.trainer.train(resume=resume)
        summary["versions"] = self.rollouts.version_log
        summary["history"] = self.trainer.history
        return summary


def _log_step(loop, step: int, m: dict) -> None:
    log.info("step %d/%d reward %.3f acc %.3f staleness %.2f wait %.2fs step %.1fs", step, loop.cfg.train.steps,
             m.get("reward/mean", float("nan")), m.get("accuracy", float("nan")), m.get("staleness/mean", 0.0),
             m.get("async/wait_s", 0.0), m["time/step_s"])


class DecoupledRun:
    """Starts (or joins) a Ray cluster and places the ledger, the workers and the learner."""

    def __init__(self, cfg: RunConfig):
        ray = self.ray = require_ray()
        d = cfg.distributed
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            if d.address is None:  # a local cluster: enough logical CPUs for every actor, even on 2 cores
                need = math.ceil(d.workers * d.worker_cpus + d.learner_cpus)
                ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, log_to_driver=True)
            else:
                ray.init(address=d.address)
        data = cfg.model_dump()
        unit_groups = math.ceil(cfg.rollout.prompts_per_step / d.workers)
        self.ledger = ray.remote(PromptLedger).options(num_cpus=0).remote()
        worker_cls = ray.remote(RolloutWorker)
        self.workers = [worker_cls.options(num_cpus=d.worker_cpus, num_gpus=d.worker_gpus, max_restarts=d.max_restarts,
                                           max_task_retries=0).remote(data, i, self.ledger, unit_groups)
                        for i in range(d.workers)]
        self.learner = ray.remote(LearnerActor).options(num_cpus=d.learner_cpus).remote(
            data, self.ledger, self.workers)

    def train(self, resume: bool = False) -> dict:
        return self.ray.get(self.learner.train.remote(resume))

    def shutdown(self) -> None:
        for a in [self.learner, *self.workers, self.ledger]:
            self.ray.kill(a)
        if self.owns_ray:
            self.ray.shutdown()
