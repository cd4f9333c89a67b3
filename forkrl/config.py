"""Typed run configuration: YAML recipes, dotted `key=value` overrides, errors that name the field.

    cfg = load_config("configs/grpo.yaml", ["train.lr=2e-5", "rollout.samples_per_prompt=4"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from forkrl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem, with the dotted field name and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "smollm2-135m"          # smollm2-135m | tiny-random | HF folder/hub id | file.gguf
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: dict[str, Any] | None = None  # peft.LoraConfig kwargs, e.g. {r: 16, lora_alpha: 32}
    # with LoRA, what the run exports: merged (OUTPUT/final, a plain model), adapter (OUTPUT/adapter, for
    # peft's PeftModel.from_pretrained on the base model) or both
    export: Literal["merged", "adapter", "both"] = "merged"
    # several LoRA adapters on the one base model, each with model.lora's options (MARFT's agents: one
    # adapter per agent, algorithms.md §19); a trajectory names the adapter that sampled it
    adapters: list[str] | None = None

    @model_validator(mode="after")
    def _adapters_need_lora(self):
        if self.adapters is not None and not self.lora:
            raise ValueError("model.adapters names LoRA adapters, but model.lora (their options) is not set")
        if self.export != "merged" and not self.lora:
            raise ValueError(f"model.export={self.export!r} exports LoRA adapters, but model.lora is not set")
        if self.adapters is not None:
            if not self.adapters or len(set(self.adapters)) != len(self.adapters):
                raise ValueError(f"model.adapters must name distinct adapters, got {self.adapters}")
            if self.export != "adapter":
                raise ValueError(f"model.export={self.export!r}: a model with several adapters has no single merged "
                                 "form; use model.export: adapter")
        return self


class RewardConfig(Section):
    name: str = "correct"               # built-in: correct | format | tool_answer; else a label for `function`
    function: str | None = None         # "module:function" or "file.py:function": TRL's or verl's signature
    # how it is called: trl (keywords prompts, completions, completion_ids, columns), verl (compute_score's
    # data_source, solution_str, ground_truth, extra_info); auto: recognised from the signature
    style: Literal["auto", "trl", "verl"] = "auto"
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)  # keyword arguments bound to the function


def _check_methods(entries: list, registry, where: str) -> list[dict]:
    """Entries of a method list (`rollout.gates`, `task.reward_terms`): a registered name, and only
    keyword parameters its function declares."""
    out = []
    for i, entry in enumerate(entries):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = entry.get("name")
        if name not in registry:
            raise ValueError(f"{where}[{i}]: unknown {registry.kind} {name!r}; allowed: {registry.names()}")
        allowed = registry.hyperparameters(name)
        for key in entry:
            if key != "name" and key not in allowed:
                raise ValueError(f"{where}[{i}].{key} is not a parameter of {registry.kind} {name!r}; allowed: {allowed}")
        out.append(entry)
    return out


class TaskConfig(Section):
    source: str = "reasoning_gym"       # a registered task source: reasoning_gym | file | hf | a plugin's
    dataset: str | None = "chain_sum"   # reasoning-gym dataset name; hf: a hub name, a local file or saved folder
    split: str = "train"                # hf: the training split
    eval_split: str | None = None       # hf: the held-out split (None: a content-hash split of the training one)
    dataset_config: dict[str, Any] = Field(default_factory=dict)  # reasoning-gym options
    load_kwargs: dict[str, Any] = Field(default_factory=dict)     # hf: datasets.load_dataset keywords, e.g. {name: main}
    train_size: int = Field(1000, gt=0)
    eval_size: int = Field(100, gt=0)
    train_path: str | None = None       # file source: .jsonl / .json / .parquet
    eval_path: str | None = None
    prompt_field: str = "prompt"        # text, or chat messages (TRL's conversational format, verl's parquet)
    # dotted for nested fields; at "answer" also tries reward_model.ground_truth, ground_truth, solution
    answer_field: str | None = "answer"
    system_prompt: str | None = None
    prompt_template: str = "{prompt}"
    few_shot: list[dict[str, str]] = Field(default_factory=list)  # [{user, assistant}] example turns
    extractor: Literal["answer_tag", "boxed", "last_number", "raw", "auto"] = "auto"
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig()])
    reward_timeout_s: float | None = Field(60.0, gt=0)  # a reward call past it stops the run, naming the sample
    # shaping added after the rewards, in order: [{name: overlong, buffer: 32}, {name: flawed_positive}, ...]
    reward_terms: list[str | dict[str, Any]] = Field(default_factory=list)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v):
        from forkrl.registry import TASK_SOURCES
        if v not in TASK_SOURCES:
            raise ValueError(f"unknown task source {v!r}; allowed: {TASK_SOURCES.names()}")
        return v

    @field_validator("reward_terms")
    @classmethod
    def _known_terms(cls, v):
        from forkrl.registry import REWARD_TERMS
        return _check_methods(v, REWARD_TERMS, "task.reward_terms")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "file" and not self.train_path:
            raise ValueError("task.train_path is required when task.source is 'file'")
        if self.source in ("reasoning_gym", "hf") and not self.dataset:
            raise ValueError(f"task.dataset is required when task.source is {self.source!r}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain '{prompt}'")
        return self


class AdaptiveTemperatureConfig(Section):
    """HAPO adaptive temperature sampling (algorithms.md §7 step 1): T' = T (1 + tau clip(h, -1, 1)),
    h the token's normalised log-entropy under the previous training batch's statistics."""
    enabled: bool = False
    tau: float = Field(0.05, ge=0, lt=1)
    pivot: float = Field(0.8, gt=0, lt=1)   # quantile of log-entropy that maps to h = 0


class VLLMConfig(Section):
    """rollout.engine=vllm (forkrl/rollout/vllm_engine.py; pip install 'forkrl[gpu]')."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # the rest stays for the learner on the same GPU
    entropy_topk: int = Field(20, gt=0)          # entropies from the top-k log-probs (approximate)
    max_model_len: int | None = Field(None, gt=0)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    enforce_eager: bool = False                  # skip CUDA graphs (faster start, slower decoding)


class RolloutConfig(Section):
    engine: str = "torch"                        # a registered engine: torch | vllm (generation with vLLM on a GPU)
    prompts_per_step: int = Field(8, gt=0)
    samples_per_prompt: int = Field(8, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    stop: list[str] = Field(default_factory=list)
    max_batch_size: int = Field(64, gt=0)       # sequences decoded together (the engine's KV-cache slots)
    # the sampling weights' dtype: auto = bfloat16 where the CPU/GPU has native bf16, else the model's
    engine_dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = "auto"
    prefix_cache_mb: float = Field(512, ge=0)   # key/value states of earlier prefixes kept for reuse; 0 = off
    cuda_graphs: bool = True                    # torch engine on CUDA: replay captured decode steps (no effect on CPU)
    sampler: str = "independent"                 # how the budget is spent: independent | arpo | latr
    sampler_params: dict[str, Any] = Field(default_factory=dict)
    adaptive_temperature: AdaptiveTemperatureConfig = Field(default_factory=AdaptiveTemperatureConfig)
    # group gates, in order: [{name: dars, n_max: 32}, {name: dynamic_sampling, max_gen_batches: 10}, ...]
    gates: list[str | dict[str, Any]] = Field(default_factory=list)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @field_validator("gates")
    @classmethod
    def _known_gates(cls, v):
        from forkrl.registry import GATES
        entries = _check_methods(v, GATES, "rollout.gates")
        names = [e["name"] for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rollout.gates lists {twice[0]!r} twice; a gate acts once per step")
        return entries

    def engine_features(self) -> dict[str, str]:
        """The engine features this section needs (forkrl.types.ENGINE_FEATURES), each with what needs it."""
        from forkrl.registry import SAMPLERS
        need = {f: f"rollout.sampler={self.sampler}" for f in SAMPLERS.hook(self.sampler, "requires", ())}
        if self.adaptive_temperature.enabled:
            need["adaptive_temperature"] = "rollout.adaptive_temperature (HAPO)"
        return need

    def unsupported_features(self, supports) -> list[str]:
        """One message per needed feature that an engine supporting `supports` lacks."""
        return [f"{who} needs the engine feature {feature!r}, which rollout.engine={self.engine} does not support "
                f"(it supports: {sorted(supports)})"
                for feature, who in self.engine_features().items() if feature not in supports]

    @model_validator(mode="after")
    def _known_sampler_and_engine(self):
        from forkrl.registry import ENGINES, SAMPLERS
        if self.sampler not in SAMPLERS:
            raise ValueError(f"rollout.sampler: unknown sampler {self.sampler!r}; allowed: {SAMPLERS.names()}")
        try:  # a bad parameter names itself here, before any weights load (a sampler is a small object)
            SAMPLERS.get(self.sampler)(**self.sampler_params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"rollout.sampler_params for {self.sampler!r}: {e}") from None
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine: unknown engine {self.engine!r}; allowed: {ENGINES.names()}")
        problems = self.unsupported_features(ENGINES.get(self.engine).supports)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RolloutCorrectionConfig(Section):
    """Importance weights for the rollout/training mismatch (algorithms.md §16; DART §15 step 4):
    rho = pi_old / pi_rollout per token, detached, multiplying the token loss before aggregation.
      token_tis:    w = min(rho, cap)              seq_tis: w = min(prod_t rho, cap) for every token
      icepop:       w = rho if low <= rho <= cap else 0
      seq_mask_tis: w = rho if low <= geometric-mean rho <= cap else 0"""
    mode: Literal["none", "token_tis", "seq_tis", "icepop", "seq_mask_tis"] = "none"
    cap: float = Field(2.0, gt=0)
    low: float = Field(0.0, ge=0)


class ReplayConfig(Section):
    """SPEAR self-imitation (algorithms.md §13.4): a buffer of successful trajectories replayed with
    a recalibrated advantage and a loss weight that rises on a cosine schedule."""
    enabled: bool = False
    capacity: int = Field(2048, gt=0)
    adv_threshold: float = 1.0              # store trajectories whose advantage is at least this
    max_age: int = Field(10, gt=0)          # steps an entry may stay
    baseline: Literal["percentile", "decay"] = "percentile"
    percentile: float = Field(50.0, ge=0, le=100)
    reward_window: int = Field(10240, gt=0)  # recent rewards the percentile baseline is taken over
    decay: float = Field(1.0, gt=0, le=1)   # baseline "decay": stored advantage x decay^age
    batch_size: int = Field(16, gt=0)       # replayed trajectories per step (UNVERIFIED: our choice)
    loss_coef: float = Field(1.0, ge=0)     # gamma reaches this ...
    warmup_steps: int = Field(200, gt=0)    # ... over this many steps (cosine)


class CriticConfig(Section):
    """PPO's learned critic (algorithms.md §19-20; verl's PPO): a value model initialised from the
    policy's weights with a zero scalar head, trained with the clipped value loss on the lambda-returns
    of GAE(gamma, lam); `algo.advantage: gae` reads its values. verl's defaults: gamma = lam = 1,
    value clip 0.5, no warm-up."""
    enabled: bool = False
    lr: float = Field(1e-5, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    value_clip: float | None = Field(0.5, gt=0)   # None: the unclipped squared error
    huber_delta: float | None = Field(None, gt=0)  # MARFT's Huber error (delta 10) in place of the square
    warmup_steps: int = Field(0, ge=0)             # the first steps train the critic only
    grad_clip: float | None = Field(1.0, gt=0)
    # where the critic is read and trained: token (a value per generated token, PPO and MARFT-T) or action
    # (one value per response, at its first token: MARFT-A's critic per (step, agent position))
    level: Literal["token", "action"] = "token"


class AlgoConfig(Section):
    advantage: str = "grpo"
    advantage_params: dict[str, Any] = Field(default_factory=dict)
    loss: str = "ppo_clip"
    loss_params: dict[str, Any] = Field(default_factory=dict)
    token_selector: str | None = None   # e.g. forking_tokens: train only on the selected tokens
    token_selector_params: dict[str, Any] = Field(default_factory=dict)
    sample_selector: str | None = None  # e.g. d3s_samples: train only on the selected rows of each group
    sample_selector_params: dict[str, Any] = Field(default_factory=dict)
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    agg_const: float | None = None      # Dr. GRPO's C; default rollout.max_new_tokens
    # tree samplers: a token several branches share is trained once (in its first row) instead of once
    # per row; pair with advantage tree_hard or branch_depth, which give it the shared advantage
    train_shared_prefix_once: bool = False
    kl_coef: float = Field(0.0, ge=0)   # 0: no reference model is loaded
    kl_estimator: Literal["k1", "abs", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+"] = "low_var_kl"
    entropy_coef: float = 0.0
    # skip the policy's optimizer step of a mini-batch whose approximate KL from the old policy,
    # mean over its trained tokens of (r - 1) - log r, exceeds this (MARFT's 1e-3, §19); None: never
    max_approx_kl: float | None = Field(None, gt=0)
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    # duration-aware updates (algorithms.md §22): each trajectory's policy loss times the seconds its
    # actions (tool calls) took, over the batch's mean (or sum, or raw); off by default
    duration_weight: Literal["off", "mean", "sum", "raw"] = "off"

    @model_validator(mode="after")
    def _critic_and_its_reader(self):
        import inspect

        from forkrl.registry import ADVANTAGES
        reads = "values" in inspect.signature(ADVANTAGES.get(self.advantage)).parameters
        if reads and not self.critic.enabled:
            raise ValueError(f"algo.advantage {self.advantage!r} reads a learned critic's values: set "
                             "algo.critic.enabled: true")
        if self.critic.enabled and not reads:
            raise ValueError(f"algo.critic.enabled trains a value model that algo.advantage {self.advantage!r} does "
                             "not read; use algo.advantage: gae")
        return self

    @model_validator(mode="after")
    def _weights_reach_the_loss(self):
        import inspect

        from forkrl.registry import LOSSES
        weighted = [name for name, on in (("algo.rollout_correction", self.rollout_correction.mode != "none"),
                                          ("algo.duration_weight", self.duration_weight != "off")) if on]
        if weighted and "weight" not in inspect.signature(LOSSES.get(self.loss)).parameters:
            raise ValueError(f"{weighted[0]} weights each token's loss, but algo.loss {self.loss!r} takes no `weight`")
        return self

    @model_validator(mode="after")
    def _shared_prefix_needs_token_aggregation(self):
        if self.train_shared_prefix_once and self.agg == "seq-mean-token-mean":
            raise ValueError("algo.train_shared_prefix_once needs a token-level aggregation (token-mean, "
                             "seq-mean-token-sum, seq-mean-token-sum-norm): seq-mean-token-mean would re-weight a "
                             "branch's remaining tokens by how much of it is shared")
        return self

    @field_validator("advantage", "loss", "token_selector", "sample_selector")
    @classmethod
    def _registered(cls, v, info):
        from forkrl.registry import ADVANTAGES, LOSSES, SELECTORS, TOKEN_SELECTORS
        registry = {"advantage": ADVANTAGES, "loss": LOSSES, "token_selector": TOKEN_SELECTORS,
                    "sample_selector": SELECTORS}[info.field_name]
        if v is not None and v not in registry:
            raise ValueError(f"unknown {registry.kind} {v!r}; allowed: {registry.names()}")
        return v

    @model_validator(mode="after")
    def _params_match_signatures(self):
        from forkrl.registry import ADVANTAGES, LOSSES, SELECTORS, TOKEN_SELECTORS
        checks = [("advantage_params", ADVANTAGES, self.advantage, self.advantage_params),
                  ("loss_params", LOSSES, self.loss, self.loss_params)]
        for kind, registry in (("token_selector", TOKEN_SELECTORS), ("sample_selector", SELECTORS)):
            name, params = getattr(self, kind), getattr(self, f"{kind}_params")
            if name:
                checks.append((f"{kind}_params", registry, name, params))
            elif params:
                raise ValueError(f"algo.{kind}_params is set but algo.{kind} is not")
        for kind, registry, name, params in checks:
            allowed = registry.hyperparameters(name)
            choices = registry.choices(name)
            for key, value in params.items():
                if key not in allowed:
                    raise ValueError(f"algo.{kind}.{key} is not a parameter of {name!r}; allowed: {allowed}")
                if key in choices and value not in choices[key]:
                    raise ValueError(f"algo.{kind}.{key} must be one of {list(choices[key])}, got {value!r}")
        return self


class TrainConfig(Section):
    steps: int = Field(20, gt=0)
    token_budget: int | None = Field(None, gt=0)  # also stop once this many tokens were sampled (forkrl compare)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up, decaying to min_lr_ratio * lr
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = 1.0
    epochs: int = Field(1, gt=0)                 # PPO epochs per rollout batch
    mini_batches: int = Field(1, gt=0)           # optimizer steps per epoch
    micro_batch_size: int = Field(16, gt=0)      # at most this many sequences per forward/backward
    # and at most ~this many tokens (prompts once + responses, as packed); "auto": what fits in
    # activation_memory_gb by the learner's per-token estimate (learner.activation_bytes_per_token)
    micro_batch_tokens: PositiveInt | Literal["auto"] = "auto"
    activation_memory_gb: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False         # recompute each decoder layer in backward: ~1/10 the activations, ~1.3x the compute
    # the learner's attention over packed rows: spans (every prefix a micro-batch's sequences share runs
    # once, each sequence over just the keys it sees: forkrl/train/attention.py) | dense (one masked
    # SDPA per row); auto: spans on the CPU, dense on accelerators
    attention: Literal["auto", "dense", "spans"] = "auto"
    old_logprobs: Literal["sampling", "recompute"] = "recompute"
    logprob_chunk: int = Field(256, gt=0)        # tokens per chunk of the vocabulary projection
    # bf16 matmuls with float32 master weights; "auto": on where the CPU/GPU has native bf16 units
    # (AVX-512 BF16 / AMX) and the model has >= 10M parameters, as rollout.engine_dtype=auto
    bf16_autocast: bool | Literal["auto"] = "auto"
    # auto: at every evaluation or every 50 steps, whichever comes first; 0: only at the end, on Ctrl-C
    # and after a failed step (a failure always keeps the last completed step)
    # where the learner and the engine run: auto (CUDA where available, else the CPU) | cpu | cuda; under
    # torchrun each rank takes its LOCAL_RANK GPU and joins an NCCL group (gloo on CPU) on an explicit mesh
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # warn when the sampler's and the learner's probabilities of the trained tokens drift apart:
    # train/logprob_mismatch = mean exp(|log p_sampling - log p_learner|) above this (NeMo-RL gates on 1.1)
    logprob_mismatch_bound: float = Field(1.1, ge=1.0)
    checkpoint_every: Literal["auto"] | NonNegativeInt = Field("auto", union_mode="left_to_right")
    max_nonfinite: int = Field(3, gt=0)          # stop after this many non-finite losses in a row


    @field_validator("device")
    @classmethod
    def _device_present(cls, v):
        if v == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise ValueError("cuda: no CUDA device here (torch.cuda.is_available() is False); use auto or cpu")
        return v


class EvalConfig(Section):
    every: int = Field(0, ge=0)                  # 0: only before and after training
    at_start: bool = True
    size: int | None = None                      # None: all held-out prompts
    max_new_tokens: int | None = None            # None: rollout.max_new_tokens
    pass_k: list[int] = Field(default_factory=lambda: [1])
    samples: int = Field(0, ge=0)                # samples per prompt for pass@k; 0 = greedy only
    temperature: float = Field(1.0, gt=0)


class EnvConfig(Section):
    """Tool use (forkrl/envs): the model writes <tool>query</tool>, gets <result>...</result> back."""
    enabled: bool = False
    tools: list[str | dict[str, Any]] = Field(default_factory=lambda: ["python"])  # names, or {name, tag?, options}
    protocol: Literal["tags", "native", "auto"] = "tags"  # native: the chat template's <tool_call> JSON;
                                                          # auto: native where the template has it
    answer_tag: str | None = "answer"              # a closed <answer> block ends the episode
    result_tag: str = "result"
    max_turns: int = Field(4, gt=0)
    max_tool_calls: int = Field(3, ge=0)
    max_total_tokens: int = Field(512, gt=0)       # generated + observation tokens per episode
    max_observation_tokens: int = Field(256, gt=0)

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, v):
        from forkrl.registry import TOOLS
        for t in v:
            name = t if isinstance(t, str) else t.get("name")
            if name not in TOOLS:
                raise ValueError(f"unknown tool {name!r}; allowed: {TOOLS.names()}")
            if isinstance(t, dict):
                TOOLS[name].check_options({k: o for k, o in t.items() if k != "name"})
        return v


class SFTConfig(Section):
    """Supervised fine-tuning (`forkrl sft`): conversations of {"messages": [...]}, loss on assistant tokens."""
    train_path: str | None = None
    batch_size: int = Field(16, gt=0)          # conversations per optimizer step
    epochs: float | None = Field(None, gt=0)   # set: train.steps = ceil(epochs * conversations / batch_size)
    group_by_length: bool = True               # batches of similar length (less padding), order seeded
    result_tag: str = "result"


class LogConfig(Section):
    tensorboard: bool = True                     # when tensorboard is installed
    wandb_project: str | None = None             # a resumed run continues the same wandb run (OUTPUT/wandb_id)
    # the names TensorBoard and wandb get: forkrl's, or verl's/TRL's where they have one (forkrl/metrics/names.py)
    metric_names: Literal["forkrl", "verl", "trl"] = "forkrl"
    progress: bool = True
    # trained tokens whose full next-token distributions are kept before and after each update, to log
    # the measured entropy change next to its first-order prediction (algorithms.md §4); 0 = off
    entropy_probe_tokens: int = Field(128, ge=0)


class SwarmConfig(Section):
    """SAPO swarm sharing (algorithms.md §13.7, §24): every worker trains its own policy copy on its
    local groups plus `external_groups` groups drawn from what the other workers shared this round."""
    enabled: bool = False
    shared_groups: int | None = Field(None, ge=0)  # groups each worker publishes per round; None: all of them
    external_groups: int = Field(2, ge=0)          # groups taken from the others (rl-swarm's num_transplant_trees)


class DistributedConfig(Section):
    """Decoupled rollout workers and learner as Ray actors (forkrl/distributed; `forkrl train --ray`)."""
    workers: int = Field(2, gt=0)                  # rollout workers (engine + sampler + env each); each samples
                                                   # ceil(rollout.prompts_per_step / workers) groups per batch
    # how many policy versions a trained token may lag the update that trains it; 0 = synchronous
    max_staleness: int = Field(0, ge=0)
    stale: Literal["drop", "requeue"] = "requeue"  # a group beyond the bound: discarded, or its prompt sampled again
    address: str | None = None                     # a running Ray cluster ("auto", "ray://host:10001"); None: start one here
    worker_cpus: float = Field(1.0, gt=0)
    worker_gpus: float = Field(0.0, ge=0)
    learner_cpus: float = Field(1.0, gt=0)            # the learner trains on the CPU (no GPU placement yet)
    max_restarts: int = Field(3, ge=0)             # a dead worker is restarted this often, its prompts re-queued
    simulated_token_delay_s: float = Field(0.0, ge=0)  # benchmarks: a worker sleeps this long per decoded token
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)


class RunConfig(Section):
    name: str = "run"
    plugins: list[str] = Field(default_factory=list)  # modules imported before validation: their registered methods

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data):
        # also here, not only in build_config: a config validated elsewhere (a Ray actor) needs them too
        from forkrl.registry import import_plugins
        if isinstance(data, dict) and isinstance(data.get("plugins"), list):
            try:
                import_plugins(data["plugins"])
            except ImportError as e:
                raise ValueError(str(e)) from None
        return data
    seed: int = 0
    output_dir: str = "runs/run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    paper: str | None = None                     # the method's paper, for recipes

    @model_validator(mode="after")
    def _sampling_logprobs_match_the_policy(self):
        if self.train.old_logprobs == "sampling" and self.rollout.adaptive_temperature.enabled:
            raise ValueError("train.old_logprobs='sampling' cannot be used with rollout.adaptive_temperature: the "
                             "sampling log-probs are not the policy's at the training temperature; use 'recompute'")
        return self

    @model_validator(mode="after")
    def _groups_to_compare(self):
        if self.rollout.samples_per_prompt == 1 and not self.sft.train_path:
            raise ValueError(f"rollout.samples_per_prompt=1: algo.advantage={self.algo.advantage!r} compares the "
                             "samples of one prompt with each other, so every advantage would be 0; use 2 or more")
        return self

    @model_validator(mode="after")
    def _methods_fit_the_run(self):
        """Each gate's, reward term's and the sampler's own `check` hook, with the whole config: a
        combination that cannot work is refused here, naming both sides."""
        from forkrl.registry import GATES, REWARD_TERMS, SAMPLERS
        check = SAMPLERS.hook(self.rollout.sampler, "check")
        problem = check(self, **self.rollout.sampler_params) if check is not None else None
        if problem:
            raise ValueError(f"rollout.sampler ({self.rollout.sampler}): {problem}")
        for registry, entries, where in ((GATES, self.rollout.gates, "rollout.gates"),
                                         (REWARD_TERMS, self.task.reward_terms, "task.reward_terms")):
            for i, entry in enumerate(entries):
                params = {k: v for k, v in entry.items() if k != "name"}
                check = registry.hook(entry["name"], "check")
                problem = check(self, **params) if check is not None else None
                if problem:
                    raise ValueError(f"{where}[{i}] ({entry['name']}): {problem}")
        if self.sft.train_path and (self.rollout.gates or self.task.reward_terms):
            raise ValueError("sft.train_path (supervised batches) cannot be used with rollout.gates or "
                             "task.reward_terms, which act on sampled groups")
        return self


def _section_fields(loc: tuple) -> list[str] | None:
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}) or []) or None


def all_keys(model: Any = None, prefix: str = "") -> list[str]:
    """Every dotted config key, sections included (`train.lr`, `rollout.vllm.dtype`, ...)."""
    model = model or RunConfig
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += all_keys(field.annotation, key + ".")
    return out


# what TRL's GRPOConfig and verl's ppo_trainer.yaml call forkrl's keys (the last part of a key is matched)
FOREIGN_KEYS = {
    "learning_rate": ("TRL", "train.lr"), "num_generations": ("TRL", "rollout.samples_per_prompt"),
    "beta": ("TRL", "algo.kl_coef"), "epsilon": ("TRL", "algo.loss_params.clip_low (ppo_clip)"),
    "epsilon_high": ("TRL", "algo.loss_params.clip_high (ppo_clip)"),
    "loss_type": ("TRL", "algo.agg (dapo/bnpo -> token-mean, grpo -> seq-mean-token-mean, "
                         "dr_grpo -> seq-mean-token-sum-norm)"),
    "max_completion_length": ("TRL", "rollout.max_new_tokens"), "max_steps": ("TRL", "train.steps"),
    "num_iterations": ("TRL", "train.epochs"), "max_grad_norm": ("TRL", "train.grad_clip"),
    "lr_scheduler_type": ("TRL", "train.schedule"), "scale_rewards": ("TRL", "algo.advantage_params.norm_by_std"),
    "per_device_train_batch_size": ("TRL", "rollout.prompts_per_step x rollout.samples_per_prompt"),
    "model_name_or_path": ("TRL", "model.name"), "save_steps": ("TRL", "train.checkpoint_every"),
    "report_to": ("TRL", "log.tensorboard / log.wandb_project"), "reward_weights": ("TRL", "task.rewards[].weight"),
    "ppo_mini_batch_size": ("verl", "train.mini_batches, a count: rollout.prompts_per_step / ppo_mini_batch_size"),
    "ppo_epochs": ("verl", "train.epochs"), "train_batch_size": ("verl", "rollout.prompts_per_step"),
    "response_length": ("verl", "rollout.max_new_tokens"), "total_training_steps": ("verl", "train.steps"),
    "kl_loss_coef": ("verl", "algo.kl_coef"), "kl_loss_type": ("verl", "algo.kl_estimator"),
    "use_kl_loss": ("verl", "algo.kl_coef > 0"), "entropy_coeff": ("verl", "algo.entropy_coef"),
    "clip_ratio": ("verl", "algo.loss_params.clip_low and clip_high (ppo_clip)"),
    "clip_ratio_low": ("verl", "algo.loss_params.clip_low"), "clip_ratio_high": ("verl", "algo.loss_params.clip_high"),
    "clip_ratio_c": ("verl", "algo.loss_params.clip_c"), "loss_agg_mode": ("verl", "algo.agg (the same values)"),
    "adv_estimator": ("verl", "algo.advantage"), "n": ("verl", "rollout.samples_per_prompt"),
    "ppo_micro_batch_size_per_gpu": ("verl", "train.micro_batch_size"),
    "lora_rank": ("verl", "model.lora.r"), "lora_r": ("TRL/peft", "model.lora.r"),
}


def suggest_key(key: str) -> str:
    """A hint for an unknown dotted key: forkrl's name for a TRL/verl key, else the closest key."""
    import difflib
    last = key.rsplit(".", 1)[-1]
    if last in FOREIGN_KEYS:
        who, ours = FOREIGN_KEYS[last]
        return f"{who}'s {last} is forkrl's {ours}"
    keys = all_keys()
    close = ([k for k in keys if k.rsplit(".", 1)[-1] == last][:1]  # the same name in another section
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
             or [k for k in keys if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.8)][:1])
    return f"did you mean {close[0]}?" if close else ""


def _format(err: ValidationError) -> str:
    parts: list = []  # lines, or (key, input, branches) of a union field (auto | int): one line for all its branches
    union: dict[str, tuple] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        if loc and isinstance(loc[-1], str) and ("[" in loc[-1] or "-" in loc[-1]):
            key = ".".join(str(p) for p in loc[:-1])
            if key not in union:
                union[key] = (key, e.get("input"), [])
                parts.append(union[key])
            union[key][2].append(e["msg"].replace("Input should be ", ""))
            continue
        name = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = suggest_key(name)
            allowed = _section_fields(loc)
            parts.append(f"unknown config key {name!r}" + (f": {hint}" if hint else "")
                         + (f" (allowed here: {', '.join(allowed)})" if allowed else ""))
        elif e["type"] == "literal_error":
            parts.append(f"{name}: got {e.get('input')!r}; {e['msg'].replace('Input should be', 'allowed:')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{name}: {msg}" + (f" (got {e.get('input')!r})" if e["type"] != "value_error" else ""))
    return "invalid config: " + "; ".join(
        p if isinstance(p, str) else f"{p[0]}: got {p[1]!r}; allowed: {' or '.join(p[2])}" for p in parts)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`a.b.c=value`; a number indexes a list (`rollout.gates.0.max_gen_batches=2`)."""
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, k, ".".join(keys[:i + 1]), dotted)
            continue
        child = node.setdefault(k, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"cannot set {dotted!r}: set the whole list ({'.'.join(keys[:-1])}=[...]) or one field of an item")
    node[keys[-1]] = value


def _list_item(items: list, key: str, where: str, dotted: str) -> dict:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"cannot set {dotted!r}: {where} needs an index below {len(items)}")
    item = items[int(key)]
    if isinstance(item, str):  # a bare method name: give it room for parameters
        item = items[int(key)] = {"name": item}
    return item


def _parse_value(raw: str) -> Any:
    """YAML scalars, lists and mappings; text that merely contains ': ' stays text."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        return raw
    return value


# switches that became registered methods: where each went (a recipe that still uses one is told)
MOVED = {
    ("algo", "dynamic_sampling"): "rollout.gates: [{name: dynamic_sampling, metric: correct, max_gen_batches: 10}]",
    ("rollout", "dars"): "rollout.gates: [{name: dars, schedule: et, n_max: 32}]",
    ("rollout", "resample_on_correct"): "rollout.gates: [{name: resample_on_correct, oversample: 2, min_each: 2}]",
    ("algo", "entropy_target"): "rollout.gates: [{name: entropy_target, target: 0.5}]",
    ("algo", "overlong"): "task.reward_terms: [{name: overlong, buffer: 32, factor: 1.0}]",
    ("algo", "flawed_positive"): "task.reward_terms: [{name: flawed_positive, penalty: 1.0, detector: rule}]",
    ("algo", "replay", "tool_reward"): "task.reward_terms: [{name: tool_call_bonus, coef: 0.1, decay_steps: 200}]",
    ("algo", "replay", "tool_reward_steps"): "task.reward_terms: [{name: tool_call_bonus, coef: 0.1, decay_steps: 200}]",
}


def _moved_keys(data: dict) -> None:
    for path, new in MOVED.items():
        node = data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{'.'.join(path)} is now a registered method; write {new}")


def flatten_settings(d: dict, prefix: str = "") -> dict:
    """A config dump as {dotted key: value} (lists and empty dicts stay whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_differ(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (saved, current)} where two config dumps differ. A key the saved dump lacks (a setting a
    later forkrl added) counts as its default, so an old run compares equal to the same recipe now."""
    defaults = flatten_settings(RunConfig().model_dump(mode="json"))
    old, new = flatten_settings(saved), flatten_settings(current)
    return {k: (old.get(k, defaults.get(k)), new.get(k, defaults.get(k))) for k in sorted(set(old) | set(new))
            if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))}


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), _parse_value(raw))
    _moved_keys(data)
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins: a list of module names, got {plugins!r}")
    from forkrl.registry import import_plugins
    try:
        import_plugins(plugins)  # before validation: a plugin's methods are names the recipe may use
    except ImportError as e:
        raise ConfigError(str(e)) from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def read_recipe(path: str | Path) -> dict:
    """A YAML recipe as a plain mapping (not validated)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return build_config(read_recipe(path) if path is not None else {}, overrides)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as a YAML recipe (every default written out; `load_config` reads it back)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=110)
