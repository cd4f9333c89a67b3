"""Plain data objects that flow from the engine through the samplers to the learner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How to sample one request. `temperature=0` is greedy.

    Log-probs and entropies are those of the full next-token distribution at `temperature`
    (top-p only restricts which token is drawn), so the learner can recompute them exactly.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # HAPO adaptive temperature (algorithms.md §7 step 1): (tau, mu, sigma, pos_scale, neg_scale). Each
    # token is drawn at T' = T (1 + tau clip(h, -1, 1)), h its normalised log-entropy at T under these
    # statistics; the reported log-prob is under T' (what was sampled), the entropy under T.
    adaptive_temperature: tuple[float, float, float, float, float] | None = None
    # report the top-k (token id, log-prob) candidates of every new token's distribution (vLLM's
    # `logprobs`); tree samplers branch on them
    logprobs: int = 0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # keep the key/value states of each finished sequence (prompt + completion) in the engine's prefix
    # cache, for a later request that continues it (a turn after a tool result, a branch)
    keep_kv: bool = False


@dataclass
class Completion:
    """One sampled continuation: per new token its id, log-prob and entropy."""
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish: str  # eos | stop | length
    text: str = ""
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token, with params.logprobs > 0


@dataclass
class ToolCall:
    name: str
    span: tuple[int, int]  # [start, end) into Trajectory.tokens
    ok: bool = True
    seconds: float = 0.0


@dataclass
class Trajectory:
    """One complete sample for one prompt (see DESIGN.md, "The core data object").

    Per-token lists (`tokens`, `logprobs`, `entropies`, `loss_mask`, `policy_version`) are aligned
    and cover everything after the prompt: generated tokens (mask 1) and tool observations (mask 0,
    log-prob 0, entropy nan).
    """
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    loss_mask: list[int]
    group: str
    policy_version: list[int] = field(default_factory=list)
    parent: int | None = None
    branch_at: int | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    rewards: dict[str, float] = field(default_factory=dict)
    reward: float = 0.0
    correct: float = 0.0
    finish: str = "eos"
    text: str = ""
    sample: Any = None  # the task Sample this trajectory answers
    turns: int = 1                  # assistant turns (tool rollouts)
    advantage: float | None = None  # set: train with this advantage instead of the estimator's
    source: str = "policy"          # policy | replay (self-imitation, own loss term) | stats_only (advantage
                                    # statistics only, not trained)

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)

    @classmethod
    def from_completion(cls, prompt_ids: list[int], c: Completion, group: str, version: int = 0,
                        sample: Any = None) -> Trajectory:
        n = len(c.token_ids)
        return cls(prompt_ids=list(prompt_ids), tokens=list(c.token_ids), logprobs=list(c.logprobs),
                   entropies=list(c.entropies), loss_mask=[1] * n, group=group,
                   policy_version=[version] * n, finish=c.finish, text=c.text, sample=sample)
