"""The loop: the only place that knows the order of a training step (DESIGN.md).

    batch = source.next_batch(step)              # collect (or SFT demonstrations, or Ray workers)
    metrics, feedback = learner.learn(batch, step)
    source.set_policy(step, feedback)            # the new policy version and what it measured
    then observe: metrics, held-out evaluation, entropy law, sinks, checkpoints

One implementation serves a single process, SFT, the Ray learner and every swarm peer, so all of
them resume, checkpoint periodically, save on Ctrl-C, stop on repeated non-finite updates and
honour token budgets the same way. Everything random is derived from (seed, step) and the
checkpoint carries every stateful component by name, so a resumed run repeats the metrics of a run
that never stopped.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from forkrl.config import dump_config, settings_differ
from forkrl.metrics import make_sinks
from forkrl.metrics.entropy import entropy_stats, fit_entropy_law
from forkrl.metrics.sinks import SampleLog
from forkrl.metrics.tools import tool_metrics
from forkrl.train.checkpoint import (
    checkpoint_candidates,
    checkpoint_problem,
    load_checkpoint,
    load_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from forkrl.train.learner import NonFiniteLoss
from forkrl.train.parallel import DataParallel
from forkrl.types import RolloutBatch, Trajectory

log = logging.getLogger("forkrl")


def peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux


def rollout_metrics(generated: list[Trajectory], tool_tags: list[str] | None = None) -> dict:
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
    for name in generated[0].rewards:  # over the trajectories each function applies to (None: NaN, left out)
        applied = [t.rewards[name] for t in generated if not math.isnan(t.rewards[name])]
        metrics[f"reward/{name}"] = float(np.mean(applied)) if applied else math.nan
    if tool_tags:
        metrics.update(tool_metrics(generated, list(tool_tags)))
    metrics.update(entropy_stats(generated))
    return metrics


class Loop:
    """Runs `cfg.train.steps` steps of source -> learner -> source, with everything around them.

    source:    next_batch / set_policy / state_dict / load_state_dict (forkrl.collect)
    learner:   learn(batch, step) -> (metrics, feedback), state_dict / load_state_dict, model, optimizer,
               scheduler (forkrl.train.learner.Learner)
    evaluate:  () -> held-out metrics;   export: (summary) -> path of the exported model
    tool_tags: the env's tool tags (tool-use metrics);  tokenizer: for the logged token samples
    on_step:   hooks called after each step as fn(loop, step, metrics); `request_stop()` ends the run
               after the current step with a checkpoint, as Ctrl-C does
    dp:        this process's rank among N (forkrl.train.parallel): rank 0 writes logs and exports and
               evaluates (the others get its results); the step's metrics are over every rank's
               trajectories; checkpoints are sharded; a stop on any rank stops all of them
    """

    def __init__(self, cfg, *, source, learner, evaluate: Callable[[], dict], export: Callable[[dict], Path],
                 tokenizer=None, tool_tags: list[str] | None = None, out_dir: Path | None = None,
                 on_step: list[Callable] | None = None, dp: DataParallel | None = None):
        self.cfg, self.source, self.learner = cfg, source, learner
        self.dp = dp or DataParallel()
        self.evaluate, self.export, self.tokenizer = evaluate, export, tokenizer
        self.tool_tags = list(tool_tags or [])
        self.out = Path(out_dir if out_dir is not None else cfg.output_dir)
        self.on_step: list[Callable] = list(on_step or [])
        self.step_idx = 0          # completed steps: the policy version
        self.nonfinite_streak = 0
        self.totals = {"sampled_tokens": 0, "tool_calls": 0, "seconds": 0.0}
        self.law_points: list[list[float]] = []
        self.history: list[dict] = []
        self.last_generated: list[Trajectory] = []
        self._stop_requested = False
        self.last_saved_step = 0   # the step of the newest checkpoint this loop wrote or resumed from

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> dict:
        t0 = time.perf_counter()
        step = self.step_idx + 1
        batch = self.source.next_batch(step)
        metrics = self.observe(batch)
        t1 = time.perf_counter()
        learned, feedback = self.learner.learn(batch, step)
        metrics.update(learned)
        if not batch.trajectories:
            log.warning("step %d: no trajectories to train on; weights unchanged", step)
        self.source.set_policy(step, feedback)
        return self._account(step, batch, metrics, t0, time.perf_counter() - t1)

    def observe(self, batch: RolloutBatch) -> dict:
        """The batch's own metrics plus what the policy did this step (over everything generated, on
        every rank)."""
        metrics: dict = dict(batch.metrics)
        if "sampler/trajectories" in metrics:  # ratios of the step's totals, not sums of ratios
            metrics["sampler/tokens_per_trajectory"] = (metrics["sampler/decoded_tokens"] + metrics[
                "sampler/prefilled_tokens"]) / max(metrics["sampler/trajectories"], 1)
        generated = [t for part in self.dp.gather(batch.generated) for t in part]
        self.last_generated = generated
        self._decoded = sum(self.dp.gather(batch.decoded_tokens))
        if generated:
            metrics.update(rollout_metrics(generated, self.tool_tags))
        return metrics

    def _account(self, step: int, batch: RolloutBatch, metrics: dict, t0: float, t_learn: float) -> dict:
        bound = self.cfg.train.logprob_mismatch_bound
        if metrics.get("train/logprob_mismatch", 1.0) > bound and self.dp.is_main:
            log.warning("step %d: the sampler's and the learner's probabilities differ (train/logprob_mismatch "
                        "%.3f > %.2f, max %.3g): stale engine weights, or sampling precision; see "
                        "algo.rollout_correction", step, metrics["train/logprob_mismatch"], bound,
                        metrics.get("train/logprob_mismatch_max", float("nan")))
        if metrics.get("train/nonfinite_updates", 0) > 0:
            self.nonfinite_streak += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                        self.nonfinite_streak)
        else:
            self.nonfinite_streak = 0
        totals = self.totals  # what the run has spent so far (checkpointed, so resumes continue it)
        totals["sampled_tokens"] += self._decoded
        totals["tool_calls"] += sum(len(t.tool_calls) for t in self.last_generated)
        totals["seconds"] += time.perf_counter() - t0
        metrics.update({"budget/sampled_tokens": float(totals["sampled_tokens"]),
                        "budget/tool_calls": float(totals["tool_calls"]), "time/total_s": totals["seconds"]})
        metrics.update({
            "time/learning_s": t_learn, "time/step_s": time.perf_counter() - t0,
            "throughput/sampling_tokens_per_s": batch.decoded_tokens / max(metrics.get("time/sampling_s", 0.0), 1e-9),
            "throughput/training_tokens_per_s": metrics.get("train/tokens", 0.0) / max(t_learn, 1e-9),
            "memory/peak_rss_gb": peak_rss_gb(),
        })
        self.step_idx = step
        return metrics

    def checkpoint_every(self) -> int:
        """train.checkpoint_every; "auto": at every evaluation or every 50 steps, whichever comes first."""
        every = self.cfg.train.checkpoint_every
        if every == "auto":
            return min(self.cfg.eval.every, 50) if self.cfg.eval.every else 50
        return every

    def budget_spent(self) -> bool:
        """train.token_budget: stop once this many tokens have been sampled (steps stays an upper bound)."""
        budget = self.cfg.train.token_budget
        return budget is not None and self.totals["sampled_tokens"] >= budget

    def entropy_law(self, metrics: dict) -> dict:
        """Refit R = -a exp(H) + b on every (sampling entropy, held-out accuracy) point so far; the
        headroom is the fitted ceiling minus the current accuracy, and a run whose entropy falls
        while under 0.05 of headroom is flagged as collapsing."""
        if metrics.get("rollout/entropy") is None or "eval/accuracy" not in metrics:
            return {}
        points = self.law_points
        points.append([metrics["rollout/entropy"], metrics["eval/accuracy"]])
        if len(points) < 3 or len({round(h, 9) for h, _ in points}) < 3:
            return {}
        law = fit_entropy_law([h for h, _ in points], [r for _, r in points])
        headroom = law.ceiling - metrics["eval/accuracy"]
        falling = points[-1][0] < points[-2][0]
        return {"law/a": law.a, "law/b": law.b, "law/ceiling": law.ceiling, "law/ceiling_se": law.ceiling_se,
                "law/headroom": headroom, "law/collapsing": float(falling and headroom < 0.05)}

    # -- checkpoints: every stateful component, by name ---------------------------------------------
    def state_dict(self) -> dict:
        return {"nonfinite_streak": self.nonfinite_streak, "totals": dict(self.totals),
                "law_points": [list(p) for p in self.law_points]}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_streak = state["nonfinite_streak"]
        self.totals = dict(state["totals"])
        self.law_points = [list(p) for p in state["law_points"]]

    def save(self, snapshot: dict | None = None) -> Path:
        """A checkpoint of the last completed step: the live state, or `snapshot` (taken when the step
        that failed began: the weights are still those of the last completed step)."""
        components = snapshot["components"] if snapshot else self._components()
        lr = self.learner
        state = {"config": json.loads(self.cfg.model_dump_json())}  # what --resume compares its settings with
        if self.dp.distributed:
            path = save_sharded_checkpoint(self.out, self.step_idx, lr.forward, lr.optimizer, lr.scheduler, self.dp,
                                           methods=components, rng=snapshot["rng"] if snapshot else None, state=state)
        else:
            path = save_checkpoint(self.out, self.step_idx, lr.model, lr.optimizer, lr.scheduler, state,
                                   methods=components, rng=snapshot["rng"] if snapshot else None)
        self.last_saved_step = self.step_idx
        return path

    def _components(self) -> dict:
        return {"loop": self.state_dict(), "learner": self.learner.state_dict(), "source": self.source.state_dict()}

    def _snapshot(self) -> dict:
        """What a step may change before its update is applied, so a step that fails can be undone."""
        return {"components": copy.deepcopy(self._components()), "rng": rng_state(),
                "optimizer_steps": _optimizer_steps(self.learner.optimizer)}

    def _save_after_failure(self, snapshot: dict | None) -> None:
        """Keep the last completed step when a reward, tool, loss or evaluation raises."""
        if self.step_idx <= self.last_saved_step:
            return
        if self.dp.distributed:  # the other ranks are not here to write their shards
            log.error("step %d failed on rank %d; the checkpoint of step %d stays the latest", self.step_idx + 1,
                      self.dp.rank, self.last_saved_step)
            return
        if snapshot is not None and _optimizer_steps(self.learner.optimizer) != snapshot["optimizer_steps"]:
            log.error("step %d failed after part of its update was applied; the checkpoint of step %d stays "
                      "the latest", self.step_idx + 1, self.last_saved_step)
            return
        try:
            path = self.save(snapshot)
            log.warning("step %d failed; saved step %d to %s (continue with --resume)", self.step_idx + 1,
                        self.step_idx, path)
        except Exception:  # the original error matters more than this one
            log.exception("could not save a checkpoint after the failure")

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint (warning about each broken one passed over), with
        this run's settings where they can take effect (`resume_changes`). False when there is none;
        a RunDirError naming the files when there are checkpoints and none can be loaded."""
        from forkrl.errors import RunDirError, UserError
        candidates, problems = checkpoint_candidates(self.out)
        lr = self.learner
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem is not None:
                problems.append(f"checkpoint {path.name} is broken ({problem})")
                continue
            saved = json.loads((path / "state.json").read_text())
            changes = resume_changes(saved.get("config"), json.loads(self.cfg.model_dump_json()))
            try:
                if self.dp.distributed:
                    state = load_sharded_checkpoint(path, lr.forward, lr.optimizer, lr.scheduler, self.dp)
                    lr.sync_sampling_weights()
                elif (path / "sharded").exists():
                    raise UserError(f"{path} is a sharded checkpoint; resume it with the --nproc it was written with")
                else:
                    state = load_checkpoint(path, lr.model, lr.optimizer, lr.scheduler)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the next checkpoint
                problems.append(f"checkpoint {path.name} could not be loaded ({type(e).__name__}: {str(e)[:200]})")
                continue
            if problems:
                log.warning("resuming from %s: %s", path, "; ".join(problems))
            self.step_idx = self.last_saved_step = state["step"]
            components = state["methods"]
            self.load_state_dict(components["loop"])
            self.learner.load_state_dict(components["learner"])
            self.source.load_state_dict(components["source"])
            apply_optimizer_settings(lr.optimizer, lr.scheduler, self.cfg.train)
            self.source.set_policy(self.step_idx, self.learner.feedback)
            log.info("resumed from %s (step %d)", path, self.step_idx)
            if changes and self.dp.is_main:
                log.warning("resumed with changed settings, in effect from step %d: %s", self.step_idx + 1,
                            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
                with open(self.out / "resumes.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step_idx, "checkpoint": path.name,
                                        "changed": {k: [old, new] for k, (old, new) in changes.items()}}) + "\n")
            return True
        if candidates or problems:
            raise RunDirError(f"cannot resume: no intact checkpoint in {self.out / 'checkpoints'}: " + "; ".join(problems))
        return False

    # -- the run ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop_requested = True

    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("Ctrl-C: finishing this step, then saving a checkpoint (press again to abort now)")

    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        main = self.dp.is_main  # rank 0 writes; every rank trains
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dp.barrier()
        resumed = self.resume() if resume else False  # before config.yaml: a refused change leaves it as it was
        if main:
            (self.out / "config.yaml").write_text(dump_config(cfg))
        if resume and not resumed:
            log.info("no checkpoint in %s; starting from scratch", self.out)
        sinks = make_sinks(self.out, cfg, self.step_idx if resumed else None) if main else []
        sample_log = SampleLog(self.out / "samples.jsonl", self.step_idx if resumed else None) if main else None
        summary: dict = {}
        every = self.checkpoint_every()
        snapshot = None
        # Ctrl-C handling needs the main thread (a Ray actor may run us elsewhere)
        main_thread = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if main_thread else None
        try:
            if cfg.eval.at_start and self.step_idx == 0:
                before = self._evaluate()
                summary["before"] = before
                for s in sinks:
                    s.write(0, before)
                log.info("held-out before training: %s", _fmt(before))
            bar = _progress(cfg, self.step_idx) if main else None
            while self.step_idx < cfg.train.steps and not self.budget_spent():
                snapshot = self._snapshot()
                metrics = self.step()
                snapshot = None  # the step completed: a later failure keeps the live state
                step = self.step_idx
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                    metrics.update(self._evaluate())
                    metrics.update(self.entropy_law(metrics))
                for s in sinks:
                    s.write(step, metrics)
                if sample_log is not None:
                    sample_log.write(step, self._token_samples())
                self.history.append(metrics)
                if bar is not None:
                    bar.set_postfix({short: f"{metrics[k]:.3g}" for short, k in _BAR_KEYS if k in metrics},
                                    refresh=False)
                    bar.update(1)
                for hook in self.on_step:
                    hook(self, step, metrics)
                if self.nonfinite_streak >= cfg.train.max_nonfinite:
                    self.save()
                    raise NonFiniteLoss(
                        f"{self.nonfinite_streak} steps in a row had a non-finite loss or gradient (last at step "
                        f"{step}); stopping. Lower train.lr, enable train.grad_clip, or check the rewards.")
                if every and step % every == 0:
                    self.save()
                if self.dp.max_int(int(self._stop_requested)):  # any rank's Ctrl-C stops every rank
                    path = self.save()
                    log.warning("stopped at step %d; checkpoint %s (continue with --resume)", step, path)
                    raise KeyboardInterrupt
            if bar is not None:
                bar.close()
            after = self._evaluate()
            if self.history:  # the final evaluation is the law's last point, at the last step's entropy
                after.update(self.entropy_law({**after, "rollout/entropy": self.history[-1].get("rollout/entropy")}))
                after.update({k: v for k, v in self.history[-1].items() if k.startswith("budget/")})
            summary["after"] = after
            for s in sinks:
                s.write(self.step_idx, after)
            if self.last_saved_step != self.step_idx or latest_is_missing(self.out):
                self.save()
            summary["export"] = str(self.export(summary)) if main else None
        except SystemExit as e:  # a tool, hook or plugin may not end the run silently
            self._save_after_failure(snapshot)
            from forkrl.errors import UserError
            raise UserError(f"user code called sys.exit({e.code!r}) during step {self.step_idx + 1}") from e
        except BaseException:  # KeyboardInterrupt included: Ctrl-C still stops, with the last step kept
            self._save_after_failure(snapshot)
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, old_handler)
            for s in sinks:
                s.close()
            if sample_log is not None:
                sample_log.close()
        summary["steps"] = self.step_idx
        if main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _evaluate(self) -> dict:
        """Held-out evaluation: on rank 0 (its engine holds the full policy), shared with every rank."""
        return self.dp.broadcast(self.evaluate() if self.dp.is_main else None)

    def _token_samples(self, k: int = 2) -> list[dict]:
        """The first k trajectories of the last step, as token strings with entropy and mask."""
        if self.tokenizer is None:
            return []
        out = []
        for t in self.last_generated[:k]:
            pieces = [self.tokenizer.decode([x]) for x in t.tokens]
            out.append({"prompt": t.sample.prompt if t.sample is not None else "", "tokens": pieces,
                        "entropy": [None if e is None or math.isnan(e) else round(e, 4) for e in t.entropies],
                        "mask": list(t.loss_mask), "reward": t.reward, "correct": t.correct})
        return out


_BAR_KEYS = (("reward", "reward/mean"), ("acc", "accuracy"), ("entropy", "policy/entropy"),
             ("len", "response_length/mean"), ("mismatch", "train/logprob_mismatch"), ("s/step", "time/step_s"))


def _fmt(m: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={_num(v)}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _num(v: float) -> str:
    """Three decimals, or three significant digits for small values (a spend of 6e-5 USD is not 0.000)."""
    return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.3f}"


def _progress(cfg, start: int):
    if not cfg.log.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)


def _optimizer_steps(optimizer) -> float:
    """How many steps the optimizer has taken (its first parameter's count; 0 before the first)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if step is not None:
                return float(step)
    return 0.0


# settings a checkpoint's state depends on: --resume refuses to change them (the identity of the run,
# its data stream, and the methods whose state the checkpoint carries)
FIXED_ON_RESUME = ("seed", "plugins", "model.name", "model.dtype", "model.lora", "task.source", "task.dataset",
                   "task.split", "task.eval_split", "task.dataset_config", "task.load_kwargs", "task.train_size",
                   "task.eval_size", "task.train_path", "task.eval_path", "task.prompt_field", "task.answer_field",
                   "rollout.sampler", "rollout.gates", "algo.advantage", "algo.loss", "algo.token_selector",
                   "algo.sample_selector", "algo.replay.enabled", "env.enabled", "env.tools", "sft.train_path",
                   "distributed.workers", "distributed.swarm.enabled")
UNCOMPARED = ("name", "output_dir", "paper")


def resume_changes(saved: dict | None, current: dict) -> dict[str, tuple]:
    """{key: (checkpoint's value, this run's)} for the settings --resume changes; a UserError naming
    the key for one that cannot change (FIXED_ON_RESUME). Checkpoints without a config: no comparison."""
    if saved is None:
        return {}
    changed = {k: v for k, v in settings_differ(saved, current).items() if k not in UNCOMPARED}
    fixed = [k for k in changed if k in FIXED_ON_RESUME or k.startswith(tuple(f + "." for f in FIXED_ON_RESUME))]
    if fixed:
        from forkrl.errors import UserError
        raise UserError("--resume cannot change " + ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in fixed)
                        + ": the checkpoint depends on it; resume with the run's setting, or start a new run "
                        "(--overwrite or another output_dir)")
    return changed


def apply_optimizer_settings(optimizer, scheduler, train) -> None:
    """This run's learning rate, betas and weight decay over what the checkpoint's optimizer restored
    (the scheduler's base rate too, so the schedule continues from the new rate at the same step)."""
    for group, factor in zip(optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]):
        group["initial_lr"] = train.lr
        group["lr"] = train.lr * factor
        group["betas"] = tuple(train.betas)
        group["weight_decay"] = train.weight_decay
    scheduler.base_lrs = [train.lr] * len(optimizer.param_groups)


def latest_is_missing(out: Path) -> bool:
    return not (out / "checkpoints" / "latest").exists()
