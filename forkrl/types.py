"""The ground floor's data: what flows from the task through the engine, samplers and collector to
the learner and back (DESIGN.md, "One step of training, as data"). Every stage imports these; this
module imports nothing from forkrl.

    Sample ─▶ GenerationRequest(SamplingParams) ─▶ Engine ─▶ Completion ─▶ Trajectory
    Trajectory × n ─▶ RolloutBatch ─▶ learner ─▶ PolicyFeedback ─▶ back to the collector
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Sample:
    """One task prompt: the user turn, its reference answer and the row's other columns."""
    id: str
    prompt: str                      # the user turn
    answer: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    # the prompt as chat messages when the data gave it so (TRL's conversational format); `prompt` is
    # then the last user turn
    messages: list[dict[str, Any]] | None = None
    # where the collector drew it in the training stream (data position), so a run can account for every
    # prompt exactly once across workers and restarts; None outside training
    position: int | None = None


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
    # the LoRA adapter to sample with (model.adapters: MARFT's agents); None: the model as it is. One
    # engine call or stream runs one adapter at a time
    adapter: str | None = None


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
    cost: float = 0.0  # the tool's price for the call (ToolResult.cost)
    error: str | None = None  # ToolResult.error: why the call failed


@dataclass
class EpisodeStep:
    """Where a step-level sample sits in its episode (UI-S1's semi-online rollouts train one sample per
    step): the episode within its group, the 0-based step, and whether the policy's action matched the
    expert's (a mismatched step was patched, or ended the episode)."""
    episode: str
    index: int
    matched: bool = True


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
    episode_step: EpisodeStep | None = None  # a step-level sample of a multi-step episode
    adapter: str | None = None      # the LoRA adapter that sampled it and trains on it (model.adapters)

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


@dataclass
class RolloutBatch:
    """What one step's collection hands to the learner: the trajectories to train on, everything
    generated (the rollout metrics describe it), the collection metrics and the decoded tokens."""
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


@dataclass
class PolicyFeedback:
    """What the learner tells the collector with each new policy version (DESIGN.md's typed feedback):
    the policy entropy the update measured (Arbitrary-Entropy PO's gate, §13.3) and the log-entropy
    statistics of the tokens it trained on (HAPO's adaptive temperature, §7 step 1). None: not known yet."""
    policy_entropy: float | None = None
    entropy_stats: dict[str, float] | None = None   # hapo_entropy_stats of the trained tokens


@dataclass
class EngineStats:
    prefill_tokens: int = 0   # prompt tokens run through the model
    cached_tokens: int = 0    # prompt tokens whose states were reused (prefix cache, or a prompt admitted with it)
    decode_tokens: int = 0    # tokens sampled
    attended_keys: int = 0    # keys decode steps attended to, summed over rows
    shared_keys: int = 0      # of those, keys read from a slot another row shares (streamed once per step)
    steps: int = 0            # sampling steps of the continuous batch (decode_tokens / steps: its mean size)
    seconds: float = 0.0
    sync_seconds: float = 0.0  # copying the learner's weights into the sampling weights
    syncs: int = 0
    entropy_topk: int = 0      # 0: exact full-distribution entropies; k: sums over the top k only (VLLMEngine)


# sampling features an engine may offer; a recipe that needs one the engine lacks is refused when the
# engine is built (forkrl.rollout.build_engine)
ENGINE_FEATURES = frozenset({"exact_entropy", "adaptive_temperature", "stop_when", "prefix_cache", "top_logprobs",
                             "adapters"})


@runtime_checkable
class Engine(Protocol):
    """What samplers, the collector and evaluation need from a generation engine."""
    tokenizer: Any
    pad_id: int
    eos_ids: list[int]
    supports: frozenset[str]   # a subset of ENGINE_FEATURES
    stats: EngineStats

    def generate(self, requests: list[GenerationRequest], seed: int | None = None,
                 stop_when=None) -> list[list[Completion]]: ...

    def weights_updated(self) -> None: ...


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists (binary search over slice comparisons, which
    run in C: the engine's admission and the learner's packing compare many long sequences)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
