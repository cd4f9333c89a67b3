"""`Trainer`: builds a run's parts from its config and hands them to the `Loop`.

    Trainer(cfg).train()          # model, task, engine, env, batch source, learner -> Loop.run()

It assembles, in the order of DESIGN.md's stages: the policy and tokenizer (forkrl.models), the task
(forkrl.tasks), the engine and env, the batch source (a `Collector`, the SFT `DemoCollector`, or
one given by the caller such as the Ray rollout client), the optimizer, schedule and `Learner`, and
the held-out evaluation. The loop itself is `forkrl.train.loop.Loop`; the Trainer adds no step logic.
"""
from __future__ import annotations

import copy
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from forkrl.collect import Collector, DemoCollector, RankPositions, build_env
from forkrl.config import RunConfig
from forkrl.metrics import evaluate
from forkrl.models import check_model_spec, load_policy, load_tokenizer, model_context
from forkrl.rollout import build_engine
from forkrl.tasks import Task, build_task
from forkrl.train.batch import pack
from forkrl.train.critic import Critic
from forkrl.train.forward import PolicyForward, resolve_autocast, response_log_softmax
from forkrl.train.learner import Learner
from forkrl.train.loop import Loop
from forkrl.train.parallel import DataParallel, adamw
from forkrl.types import GenerationRequest, SamplingParams, Trajectory

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def check_before_loading(cfg: RunConfig, model_given: bool = False) -> None:
    """The run's inputs besides the task (which `build_task` checks): the model path, LoRA options,
    the SFT data and optional dependencies. Raises a one-line UserError; loads nothing heavy."""
    import importlib.util

    from forkrl.errors import DataError, missing_dependency
    if not model_given:
        check_model_spec(cfg.model.name, cfg.model.lora)
    if cfg.sft.train_path and not Path(cfg.sft.train_path).exists():
        raise DataError(f"sft.train_path: data file not found: {cfg.sft.train_path}")
    if cfg.log.wandb_project and importlib.util.find_spec("wandb") is None:
        raise missing_dependency("wandb", "wandb", "log.wandb_project")
    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise missing_dependency("vllm", "gpu", "rollout.engine=vllm")
    if cfg.env.enabled:
        check_sandbox(cfg.env.tools)
    if cfg.rollout.sampler == "agent_program":
        for module in ("aiohttp", "openai"):
            if importlib.util.find_spec(module) is None:
                raise missing_dependency(module, "agents", "rollout.sampler=agent_program")


def check_sandbox(tools: list) -> None:
    """The python tool's isolation exists here, or the user asked for none (UserError otherwise)."""
    from forkrl.envs.sandbox import bwrap_available
    from forkrl.errors import UserError
    for t in tools:
        name, options = (t, {}) if isinstance(t, str) else (t.get("name"), t)
        if name == "python" and options.get("isolation", "auto") != "process" and not bwrap_available():
            raise UserError("env.tools: the python tool needs bubblewrap to isolate model-written code (apt-get install "
                            "bubblewrap; user namespaces enabled); isolation: process runs it unprotected")


def check_data_parallel(cfg: RunConfig, dp: DataParallel, custom_source: bool) -> None:
    """What cannot run as N ranks yet is refused, in one line (UserError)."""
    if not dp.distributed:
        return
    from forkrl.errors import UserError
    P = cfg.rollout.prompts_per_step
    problems = []
    if P % dp.world:
        problems.append(f"rollout.prompts_per_step={P} is not a multiple of the {dp.world} ranks (each collects "
                        "whole groups of its own)")
    if cfg.sft.train_path:
        problems.append("forkrl sft (its demonstration batches are not split across ranks yet)")
    if any(g["name"] == "entropy_target" for g in cfg.rollout.gates):
        problems.append("the entropy_target gate (it steers on the batch's entropy, which a rank sees only part of)")
    if cfg.algo.loss_params.get("scope") == "micro":
        problems.append(f"algo.loss_params.scope=micro ({cfg.algo.loss}'s statistics per micro-batch depend on how "
                        "rows fall into micro-batches on each rank; scope=batch is global)")
    if custom_source:
        problems.append("a custom batch source (Ray rollouts, swarm peers)")
    if cfg.algo.critic.enabled:
        problems.append("algo.critic (the value model is not sharded yet: PPO with a critic runs in one process)")
    if cfg.model.adapters:
        problems.append("model.adapters (switching adapters per micro-batch is not wired into FSDP yet)")
    if problems:
        raise UserError(f"--nproc {dp.world} cannot run: " + "; ".join(problems))


class Trainer:
    """A run: its parts (`model`, `tokenizer`, `task`, `engine`, `env`, `source`, `learner`) and its
    `loop`. `source` replaces the default batch source (the Ray learner passes its rollout client);
    `wrap_source(collector) -> source` wraps the default one (a swarm peer shares its groups)."""

    def __init__(self, cfg: RunConfig, *, model=None, tokenizer=None, task: Task | None = None, source=None,
                 wrap_source=None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        # everything a user can get wrong is checked before any weights load
        self.task = task if task is not None else build_task(cfg.task, seed=cfg.seed)
        check_before_loading(cfg, model_given=model is not None)
        if model is None:  # the tokenizer and the config first: a prompt too long for the model is a data error
            self._check_prompt_lengths(load_tokenizer(cfg.model.name), model_context(cfg.model.name))
            model, tokenizer = load_policy(cfg.model.name, dtype=cfg.model.dtype, lora=cfg.model.lora, seed=cfg.seed,
                                           adapters=cfg.model.adapters)
        else:
            self._check_prompt_lengths(tokenizer, getattr(model.config, "max_position_embeddings", None))
        self.model, self.tokenizer = model, tokenizer
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # transformers recomputes a layer only in training mode (from_pretrained returns eval mode, and
            # checkpointing was then silently off); dropout stays off, so the learner's log-probs are the
            # sampled policy's
            model.train()
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                if isinstance(getattr(module, "attention_dropout", None), float):
                    module.attention_dropout = 0.0
        # one process, or this rank of `forkrl train --nproc N` (torchrun): the learner is then sharded and
        # the engine samples from its own full copy of the weights, refreshed after every update
        self.dp = dp = DataParallel.from_env(cfg.train.device)
        if next(model.parameters()).device != dp.device:
            model.to(dp.device)
        check_data_parallel(cfg, dp, source is not None or wrap_source is not None)
        sampling_model = copy.deepcopy(model) if dp.distributed else model
        self.engine = build_engine(cfg.rollout, sampling_model, tokenizer, seed=cfg.seed)
        self.env = build_env(cfg, sampling_model, tokenizer, seed_of_call=lambda: self.loop.step_idx)
        t = cfg.train
        if cfg.sft.train_path:
            from forkrl.tasks.conversations import load_conversations
            demos = load_conversations(cfg.sft.train_path, tokenizer, cfg.sft.result_tag)
            if cfg.sft.epochs:
                t.steps = math.ceil(cfg.sft.epochs * len(demos) / cfg.sft.batch_size)
            source = source or DemoCollector(demos, batch_size=cfg.sft.batch_size, seed=cfg.seed,
                                             group_by_length=cfg.sft.group_by_length)
        if source is None and dp.distributed:  # this rank's share of the groups, from its own data positions
            share = cfg.model_copy(deep=True)
            share.rollout.prompts_per_step = cfg.rollout.prompts_per_step // dp.world
            source = Collector(share, task=self.task, engine=self.engine, tokenizer=tokenizer, env=self.env,
                               positions=RankPositions(dp.rank, dp.world), seed_salt=dp.rank)
        if source is None:
            source = Collector(cfg, task=self.task, engine=self.engine, tokenizer=tokenizer, env=self.env)
        self.source = wrap_source(source) if wrap_source is not None else source
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        temperature = cfg.rollout.temperature or 1.0
        autocast = resolve_autocast(t.bf16_autocast, model)
        self.policy = PolicyForward(model, temperature=temperature, chunk=t.logprob_chunk, autocast=autocast,
                                    attention=t.attention)
        # FSDP2 under torchrun (nothing in one process); where the learner computes in bf16 anyway, the
        # shards are gathered in bf16 too (half the traffic) and gradients reduced in float32
        dp.shard(self.policy, model, mixed_precision=autocast)
        # PPO's value model: a copy of the policy's network as it starts, with its own optimizer
        critic = (Critic(copy.deepcopy(model), cfg.algo.critic, autocast=autocast, attention=t.attention)
                  if cfg.algo.critic.enabled else None)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.learner = Learner(model, self.optimizer, self.scheduler, cfg, ref_model=self.ref_model,
                               pad_id=self.engine.pad_id, temperature=temperature,
                               max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed, forward=self.policy, dp=dp,
                               sampling_model=sampling_model if dp.distributed else None, critic=critic)
        self.sampling_model = sampling_model
        self.loop = Loop(cfg, source=self.source, learner=self.learner, evaluate=self.evaluate, export=self.export,
                         tokenizer=tokenizer, tool_tags=list(self.env.tools) if self.env is not None else None,
                         out_dir=self.out, dp=dp, on_step=[self._check_greedy_after_first_sync])
        self.greedy_agreement: float | None = None

    def _check_prompt_lengths(self, tokenizer, context: int | None) -> None:
        if context and tokenizer is not None:
            new_tokens = max(self.cfg.rollout.max_new_tokens, self.cfg.eval.max_new_tokens or 0)
            self.task.check_prompt_lengths(tokenizer, context - new_tokens,
                                           f"the model's context of {context} less {new_tokens} new tokens")

    # the loop's counters, read by callers and tests
    @property
    def step_idx(self) -> int:
        return self.loop.step_idx

    @property
    def history(self) -> list[dict]:
        return self.loop.history

    def train(self, resume: bool = False) -> dict:
        try:
            return self.loop.run(resume=resume)
        finally:  # a sampler that holds a server or workers (agent programs) lets them go
            close = getattr(getattr(self.source, "sampler", None), "close", None)
            if close is not None:
                close()

    def step(self) -> dict:
        """One step of the loop (collect, learn, hand the new policy back), without sinks or evaluation."""
        return self.loop.step()

    def save(self) -> Path:
        return self.loop.save()

    def resume(self) -> bool:
        return self.loop.resume()

    def _check_greedy_after_first_sync(self, loop, step: int, metrics: dict) -> None:
        if step == 1 and not self.cfg.sft.train_path and self.task.eval:
            self.greedy_agreement = self.greedy_agreement_check()

    def greedy_agreement_check(self, n_prompts: int = 4, max_tokens: int = 16) -> float:
        """Once, after the first weight sync: the engine decodes a few held-out prompts greedily, and the
        learner's argmax at each of those positions should be the token the engine chose. Below 1 means
        the two disagree beyond near-ties (weights not synced, precision, a template mismatch); logged."""
        samples = self.task.eval[:n_prompts]
        prompts = [self.task.prompt_ids(s, self.tokenizer) for s in samples]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        outs = self.engine.generate([GenerationRequest(p, params) for p in prompts], seed=self.cfg.seed)
        trajs = [Trajectory.from_completion(p, o[0], group=str(i)) for i, (p, o) in enumerate(zip(prompts, outs))
                 if o[0].token_ids]
        if not trajs:
            return 1.0
        batch = pack(trajs, self.engine.pad_id)
        argmax = response_log_softmax(self.policy, batch).argmax(-1).cpu()
        agree = float((argmax == batch.resp_ids[batch.loss_mask > 0]).float().mean())
        (log.info if agree >= 0.95 else log.warning)(
            "greedy sampling and the learner's argmax agree on %.0f%% of %d tokens after the first weight sync%s",
            100 * agree, len(argmax), "" if agree >= 0.95 else ": check the engine's weights and precision")
        return agree

    # -- evaluation and export --------------------------------------------------------------------
    def evaluate(self, generations: bool = False) -> dict:
        """Held-out metrics; with `generations`, also every completion under "generations"."""
        e, r = self.cfg.eval, self.cfg.rollout
        samples = self.task.eval[:e.size] if e.size else self.task.eval
        generate = self._tool_rollout if self.env is not None else None
        # a sampler that runs whole episodes itself (agent programs) evaluates through them
        sampler = getattr(self.source, "sampler", None)
        episodes = getattr(sampler, "evaluation_rollout", None)
        if episodes is not None:
            generate = episodes(self.engine, self.tokenizer, self.step_idx)
        res = evaluate(self.engine, self.task, samples, max_new_tokens=e.max_new_tokens or r.max_new_tokens,
                       stop=r.stop, pass_k=e.pass_k, n_samples=e.samples, temperature=e.temperature,
                       seed=self.cfg.seed + 17, generate=generate, tools=self.env is not None,
                       # an episode's own reward (agent programs, UI-S1's SOP), unless the task scores it (MARFT)
                       episode_rewards=episodes is not None and getattr(sampler, "evaluation_rewards", True))
        if not generations:
            res.pop("generations", None)
        return res

    def _tool_rollout(self, prompts, samples, params, seed, groups=None):
        from forkrl.rollout.agent import multi_turn_rollout
        groups = groups or [str(i) for i in range(len(prompts))]
        trajs = multi_turn_rollout(self.engine, self.env, self.tokenizer, prompts, groups, samples, params, seed,
                                   version=self.step_idx)
        return [trajs[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def export(self, summary: dict | None = None) -> Path:
        """The trained policy as Hugging Face folders, each with a model card (recipe, held-out scores):
        OUTPUT/final (LoRA merged; loadable as model.name) and, with model.export adapter|both,
        OUTPUT/adapter (peft adapters for the base model). Returns the first one written."""
        from forkrl.train.run_dir import write_model_card
        mode = self.cfg.model.export if self.cfg.model.lora else "merged"
        paths = []
        if mode in ("merged", "both"):
            model = self.sampling_model  # the policy itself in one process; its full copy on each rank
            if hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            paths.append(self.out / "final")
            model.save_pretrained(paths[-1])
        if mode in ("adapter", "both"):
            paths.append(self.out / "adapter")
            self.sampling_model.save_pretrained(paths[-1])  # a PeftModel saves its adapters only
        for path in paths:
            self.tokenizer.save_pretrained(path)
            write_model_card(path, self.cfg, summary or {}, adapter=path.name == "adapter")
        return paths[0]
