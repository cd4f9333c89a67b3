"""The learner: trajectories -> padded tensors -> log-probs/entropies in bounded memory -> PPO updates.

Memory: the vocabulary projection runs on chunks of `chunk` response tokens under activation
checkpointing, so neither the forward nor the backward ever holds a [batch, time, vocab] tensor;
only response tokens the policy generated are projected (prompt and observation tokens are not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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
from forkrl.algos.correction import rollout_correction_weights
from forkrl.algos.entropy_losses import hapo_entropy_stats
from forkrl.algos.losses import AggNorm
from forkrl.algos.schedules import cosine_ramp
from forkrl.collect import derive_seed
from forkrl.train.replay import ReplayBuffer
from forkrl.types import PolicyFeedback, RolloutBatch, Trajectory


@dataclass
class PackedBatch:
    """Trajectories as tensors. Each distinct prompt is stored once (left-padded, [P, Tp]) and
    responses point at their prompt row (`prompt_index`), so a group of n samples runs its prompt
    through the model once and shares it, with gradient, across the n responses."""
    prompt_ids: Tensor       # [P, Tp] left-padded
    prompt_mask: Tensor      # [P, Tp]
    prompt_index: Tensor     # [B] row of prompt_ids each response continues
    resp_ids: Tensor         # [B, L] right-padded
    resp_mask: Tensor        # [B, L] 1 on every response token (generated or observation)
    loss_mask: Tensor        # [B, L] 1 on tokens the policy generated
    sampling_logp: Tensor    # [B, L]
    sampling_entropy: Tensor # [B, L] entropy at sampling time (0 where loss_mask is 0)
    rewards: Tensor          # [B]
    group_ids: Tensor        # [B]
    fixed_adv: Tensor        # [B] advantage set on the trajectory (nan: use the estimator's)
    replay: Tensor           # [B] bool: self-imitation rows (their own loss term)
    stats_only: Tensor       # [B] bool: rows that count in group statistics but do not train
    train_mask: Tensor | None = None  # [B, L] tokens the loss counts: loss_mask narrowed by a token selector
    # [B, L] which sampled token each position is: row * L + position of the row that generated it, so
    # a branch's prefix carries its parent's keys (tree samplers); -1 on padding
    token_origin: Tensor | None = None

    def __post_init__(self):
        if self.train_mask is None:
            self.train_mask = self.loss_mask

    def __len__(self) -> int:
        return self.resp_ids.shape[0]

    def select(self, idx: Tensor) -> PackedBatch:
        """Rows `idx` with only the prompts they use, trimmed to their longest response."""
        used, prompt_index = torch.unique(self.prompt_index[idx], return_inverse=True)
        pm = self.prompt_mask[used]
        tp = int(pm.sum(-1).max())
        lm = self.loss_mask[idx]
        L = max(int(((lm > 0) * torch.arange(1, lm.shape[1] + 1)).max()), 1)
        return PackedBatch(self.prompt_ids[used, -tp:], pm[:, -tp:], prompt_index, self.resp_ids[idx, :L],
                           self.resp_mask[idx, :L], lm[:, :L], self.sampling_logp[idx, :L],
                           self.sampling_entropy[idx, :L], self.rewards[idx], self.group_ids[idx],
                           self.fixed_adv[idx], self.replay[idx], self.stats_only[idx], self.train_mask[idx, :L],
                           None if self.token_origin is None else self.token_origin[idx, :L])


def pack(trajectories: list[Trajectory], pad_id: int) -> PackedBatch:
    """The one place a list of trajectories becomes tensors."""
    prompts: dict[tuple[int, ...], int] = {}
    for t in trajectories:
        prompts.setdefault(tuple(t.prompt_ids), len(prompts))
    P, Tp = len(prompts), max(len(p) for p in prompts)
    prompt_ids = torch.full((P, Tp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((P, Tp), dtype=torch.long)
    for p, row in prompts.items():
        prompt_ids[row, Tp - len(p):] = torch.tensor(p)
        prompt_mask[row, Tp - len(p):] = 1
    B, L = len(trajectories), max(max(len(t.tokens) for t in trajectories), 1)
    resp_ids = torch.full((B, L), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((B, L), dtype=torch.long)
    loss_mask = torch.zeros((B, L), dtype=torch.float32)
    logp = torch.zeros((B, L), dtype=torch.float32)
    entropy = torch.zeros((B, L), dtype=torch.float32)
    groups: dict[str, int] = {}
    for b, t in enumerate(trajectories):
        n = len(t.tokens)
        if n:
            resp_ids[b, :n] = torch.tensor(t.tokens)
            resp_mask[b, :n] = 1
            loss_mask[b, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
            logp[b, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
            entropy[b, :n] = torch.nan_to_num(torch.tensor(t.entropies, dtype=torch.float32)) * loss_mask[b, :n]
        groups.setdefault(t.group, len(groups))
    return PackedBatch(
        prompt_ids, prompt_mask, torch.tensor([prompts[tuple(t.prompt_ids)] for t in trajectories]),
        resp_ids, resp_mask, loss_mask, logp, entropy,
        torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        torch.tensor([groups[t.group] for t in trajectories], dtype=torch.long),
        torch.tensor([math.nan if t.advantage is None else t.advantage for t in trajectories], dtype=torch.float32),
        torch.tensor([t.source == "replay" for t in trajectories], dtype=torch.bool),
        torch.tensor([t.source == "stats_only" for t in trajectories], dtype=torch.bool),
        token_origin=token_origin(trajectories, L))


def token_origin(trajectories: list[Trajectory], L: int) -> Tensor:
    """[B, L] key of the sampled token at each position (see PackedBatch.token_origin). A branch
    (`parent` = index of an earlier member of its group, `branch_at` = tokens it shares) takes its
    parent's keys for the shared prefix, checked token by token so a stale index cannot merge
    different tokens."""
    B = len(trajectories)
    origin = torch.full((B, L), -1, dtype=torch.long)
    members: dict[str, list[int]] = {}
    for b, t in enumerate(trajectories):
        rows = members.setdefault(t.group, [])
        n = len(t.tokens)
        origin[b, :n] = b * L + torch.arange(n)
        p, k = t.parent, t.branch_at
        if p is not None and k and 0 <= p < len(rows):
            parent = trajectories[rows[p]]
            if parent.prompt_ids == t.prompt_ids and k <= min(len(parent.tokens), n) and parent.tokens[:k] == t.tokens[:k]:
                origin[b, :k] = origin[rows[p], :k]
        rows.append(b)
    return origin


def first_occurrence(origin: Tensor) -> Tensor:
    """[B, L] True where a token key appears for the first time in row-major order (and on padding)."""
    flat = origin.flatten()
    valid = flat >= 0
    _, inverse = torch.unique(flat[valid], return_inverse=True)
    pos = torch.arange(len(flat))[valid]
    first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(flat), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    out = torch.ones_like(flat, dtype=torch.bool)
    out[pos] = first[inverse] == pos
    return out.view_as(origin)


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _autocast(enabled: bool):
    """bf16 autocast on the model's device (float32 master weights stay as they are)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _project(head, h: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor]:
    logits = head(h).float() * inv_temp
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@dataclass
class PackedRows:
    """Responses packed into rows behind their prompt, for one forward without padding waste.

    Row layout: [prompt | response a | response b | ...], all responses of one prompt, filled up to
    the longest (prompt + response) of the batch, so a packed row is never longer than an unpacked
    one would be. A 4D mask lets each response see the prompt and its own earlier tokens only, and
    positions restart after the prompt for each response, so every response computes exactly what it
    would alone; the prompt runs once per row and gets the gradient of every response in it.
    """
    ids: Tensor       # [R, C]
    positions: Tensor # [R, C]
    mask: Tensor      # [R, 1, C, C] bool: key j visible to query i
    before: Tensor    # [N] flat index into R*C of the state before each loss_mask token (row-major)
    padding: float    # share of the R*C positions that are padding


def pack_rows(batch: PackedBatch) -> PackedRows:
    valid = batch.loss_mask > 0
    L = valid.shape[1]
    # response tokens that matter: up to the last one the loss reads
    need = (valid * torch.arange(1, L + 1)).max(-1).values.tolist()
    plen = batch.prompt_mask.sum(-1).tolist()
    pidx = batch.prompt_index.tolist()
    cap = max(plen[p] + n for p, n in zip(pidx, need))
    rows: list[list[int]] = []          # per row: prompt, then trajectory indices
    place: dict[int, tuple[int, int]] = {}  # trajectory -> (row, offset of its first token)
    open_row: dict[int, tuple[int, int]] = {}  # prompt -> (row, used length)
    for b, (p, n) in enumerate(zip(pidx, need)):
        if n == 0:
            continue
        r, used = open_row.get(p, (-1, cap + 1))
        if used + n > cap:
            r, used = len(rows), plen[p]
            rows.append([p])
        rows[r].append(b)
        place[b] = (r, used)
        open_row[p] = (r, used + n)
    R, C = max(len(rows), 1), cap
    ids = torch.zeros((R, C), dtype=torch.long)  # padding ids: any token, the mask isolates them
    pos = torch.zeros((R, C), dtype=torch.long)
    seg = torch.full((R, C), -2, dtype=torch.long)      # -1 prompt, b response b, -2 padding
    for r, (p, *members) in enumerate(rows):
        n_p = plen[p]
        ids[r, :n_p] = batch.prompt_ids[p, -n_p:]
        pos[r, :n_p] = torch.arange(n_p)
        seg[r, :n_p] = -1
        for b in members:
            _, off = place[b]
            n = need[b]
            ids[r, off:off + n] = batch.resp_ids[b, :n]
            pos[r, off:off + n] = n_p + torch.arange(n)
            seg[r, off:off + n] = b
    causal = torch.ones((C, C), dtype=torch.bool).tril()
    qs, ks = seg.unsqueeze(2), seg.unsqueeze(1)
    mask = (causal & ((ks == qs) | (ks == -1))).unsqueeze(1)  # padding sees itself: no empty softmax row
    before = []
    for b, t in valid.nonzero().tolist():
        r, off = place[b]
        before.append(r * C + (plen[rows[r][0]] - 1 if t == 0 else off + t - 1))
    padding = float((seg == -2).sum()) / (R * C)
    return PackedRows(ids, pos, mask, torch.tensor(before, dtype=torch.long), padding)


def _response_hidden(model, batch: PackedBatch, autocast: bool = False) -> tuple[Tensor, Tensor, Tensor, object]:
    """Hidden state before each response token where loss_mask is set, [N, d], with those tokens [N],
    the [B, L] mask that selects them, and the output head. One forward over `pack_rows(batch)`."""
    decoder, head = _decoder_and_head(model)
    packed = pack_rows(batch)
    with _autocast(autocast):
        out = decoder(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                      use_cache=False).last_hidden_state
    valid = batch.loss_mask > 0
    hidden = out.reshape(-1, out.shape[-1])[packed.before]
    return hidden, batch.resp_ids[valid], valid, head


def response_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, chunk: int = 1024,
                      autocast: bool = False) -> tuple[Tensor, Tensor]:
    """Log-prob of each response token and entropy of its full next-token distribution, [B, L] each,
    under softmax(logits / temperature); zero where loss_mask is 0. The vocabulary projection runs in
    chunks of `chunk` tokens (checkpointed under grad), so [N, V] logits never exist at once."""
    h, targets, valid, head = _response_hidden(model, batch, autocast)
    B, L = batch.resp_ids.shape
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    lp_parts, ent_parts = [], []
    with _autocast(autocast):  # the head is a fifth of the model's matmuls: same precision as the rest
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            if torch.is_grad_enabled():
                lp, ent = checkpoint(_project, head, hc, tc, inv_temp, use_reentrant=False)
            else:
                lp, ent = _project(head, hc, tc, inv_temp)
            lp_parts.append(lp)
            ent_parts.append(ent)
    logp = torch.zeros((B, L), dtype=torch.float32)
    entropy = torch.zeros((B, L), dtype=torch.float32)
    if lp_parts:
        where = valid.nonzero(as_tuple=True)
        logp = logp.index_put(where, torch.cat(lp_parts))
        entropy = entropy.index_put(where, torch.cat(ent_parts))
    return logp, entropy


@torch.no_grad()
def response_log_softmax(model, batch: PackedBatch, *, temperature: float = 1.0) -> Tensor:
    """The full next-token log-distribution at every trained response position, [N, V] (row-major
    over loss_mask). For small probes only: N x V floats."""
    h, _, _, head = _response_hidden(model, batch)
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    return torch.log_softmax(head(h).float() * inv_temp, dim=-1)


def entropy_change(before: Tensor, after: Tensor) -> dict[str, float]:
    """Measured vs first-order predicted entropy change of the same states, from their full
    log-distributions before and after an update ([N, V] each).

    Cui et al. (2025, arXiv 2505.22617, Lemma 1; algorithms.md §4): for a softmax policy whose logits
    move by dz, H(after) - H(before) ~= -Cov_{a~pi}(log pi(a|s), dz(a)). d log pi differs from dz by
    a constant per state, which the covariance ignores, so d log pi stands in for dz exactly.
    """
    p = before.exp()
    h_before = -(p * before).sum(-1)
    h_after = -(after.exp() * after).sum(-1)
    centred = before + h_before.unsqueeze(-1)           # log pi - E_pi[log pi]
    predicted = -(p * centred * (after - before)).sum(-1)
    measured = h_after - h_before
    out = {"entropy/delta_measured": float(measured.mean()), "entropy/delta_predicted": float(predicted.mean())}
    if measured.numel() > 2 and float(measured.std()) > 0 and float(predicted.std()) > 0:
        out["entropy/delta_state_corr"] = float(torch.corrcoef(torch.stack([measured, predicted]))[0, 1])
    return out


def resolve_autocast(setting, model) -> bool:
    """train.bf16_autocast resolved: "auto" is on exactly where rollout.engine_dtype=auto picks bf16."""
    if setting != "auto":
        return bool(setting)
    from forkrl.rollout.engine import resolve_dtype
    return next(model.parameters()).dtype == torch.float32 and resolve_dtype("auto", model) == torch.bfloat16


def activation_bytes_per_token(model, checkpointing: bool = False, autocast: bool = False) -> int:
    """Activation memory a trained token holds until backward, estimated from the model's shape.

    Per decoder layer autograd keeps, in float32: the residual input and the two norm outputs, q, k, v,
    the attention output and its projection (about 7 x hidden + 2 x kv width), and the MLP's gate, up,
    activation and product (4 x intermediate); autocast adds bf16 copies of the matmul inputs (2 bytes
    x (4 x hidden + intermediate)). With checkpointing a layer keeps only its input, plus one layer's
    full set while it is recomputed. Against the bytes autograd actually saves on SmolLM2-135M
    (tests/test_learner_memory.py) it is within 1.5x either way.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    c = base.config
    d = c.hidden_size
    inter = getattr(c, "intermediate_size", 4 * d)
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads) * (getattr(c, "head_dim", None) or d // c.num_attention_heads)
    per_layer = 4 * (7 * d + 2 * kv + 4 * inter) + (2 * (4 * d + inter) if autocast else 0)
    layers = c.num_hidden_layers
    return 4 * d * layers + per_layer if checkpointing else per_layer * layers


class NonFiniteLoss(RuntimeError):
    pass


def micro_batches(batch: PackedBatch, rows: Tensor, max_rows: int, max_tokens: int) -> list[Tensor]:
    """Split `rows` (in order) into micro-batches of at most `max_rows` sequences and about `max_tokens`
    tokens: each distinct prompt once plus every response (what `pack_rows` runs; a single longer row
    goes alone)."""
    prompt_len = batch.prompt_mask.sum(-1).tolist()
    pos = torch.arange(1, batch.loss_mask.shape[1] + 1)
    resp_len = ((batch.loss_mask > 0) * pos).max(-1).values.tolist()
    prompt_of = batch.prompt_index.tolist()
    out, current, tokens, prompts = [], [], 0, set()
    for r in rows.tolist():
        cost = resp_len[r] + (0 if prompt_of[r] in prompts else prompt_len[prompt_of[r]])
        if current and (len(current) >= max_rows or tokens + cost > max_tokens):
            out.append(torch.tensor(current))
            current, tokens, prompts = [], 0, set()
            cost = resp_len[r] + prompt_len[prompt_of[r]]
        current.append(r)
        tokens += cost
        prompts.add(prompt_of[r])
    if current:
        out.append(torch.tensor(current))
    return out


class Learner:
    """Turns scored trajectories into optimizer steps (PPO epochs x mini-batches x micro-batches).

    Stages, in order, on the packed batch: advantages (trajectories may carry a fixed one), sample
    selection, token selection, old/reference log-probs, the loss's batch statistics (`prepare`),
    then per micro-batch the loss, times rollout-correction weights, plus KL and entropy terms.
    Replay rows (self-imitation) form a second loss term with its own normaliser and coefficient.
    """

    def __init__(self, model, optimizer, scheduler, cfg, *, ref_model=None, pad_id: int = 0,
                 temperature: float = 1.0, max_new_tokens: int = 128, seed: int = 0):
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
        self.autocast = resolve_autocast(cfg.train.bf16_autocast, model)
        mb = cfg.train.micro_batch_tokens
        self.micro_tokens = mb if mb != "auto" else max(64, int(
            cfg.train.activation_memory_gb * 2**30 / activation_bytes_per_token(
                model, cfg.train.gradient_checkpointing, self.autocast)))
        self.state: dict = {}  # the loss's state across steps (e.g. EPO's per-turn entropy history); checkpointed
        self.last_seq_adv: list[float] = []  # per input trajectory, its mean advantage (SPEAR's buffer reads it)
        self.replay = ReplayBuffer(a.replay) if a.replay.enabled else None
        self.feedback = PolicyFeedback()  # what the last update told the collector (checkpointed)

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
        if not trajs:
            return metrics, self.feedback
        metrics.update(self.update(trajs + replayed, step, replay_coef=replay_coef))
        if self.replay is not None:
            metrics["replay/added"] = float(self.replay.add(step, trajs, self.last_seq_adv[:len(trajs)]))
        fb = dataclasses.replace(self.feedback)
        if "policy/entropy" in metrics:
            fb.policy_entropy = float(metrics["policy/entropy"])
        at = self.cfg.rollout.adaptive_temperature
        if at.enabled:
            ent = [e for t in trajs if t.source == "policy" for e, m in zip(t.entropies, t.loss_mask) if m]
            if ent:
                x = torch.tensor(ent)
                fb.entropy_stats = hapo_entropy_stats(x, torch.ones_like(x), at.pivot)
                metrics["rollout/adaptive_temperature"] = 1.0
        self.feedback = fb
        return metrics, fb

    def state_dict(self) -> dict:
        return {"loss": self.state, "replay": self.replay.state_dict() if self.replay is not None else None,
                "feedback": dataclasses.asdict(self.feedback)}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["loss"]
        if self.replay is not None and state.get("replay"):
            self.replay.load_state_dict(state["replay"])
        self.feedback = PolicyFeedback(**state["feedback"])

    def _logprobs(self, model, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        t = self.cfg.train
        return response_logprobs(model, batch, temperature=self.temperature, chunk=t.logprob_chunk,
                                 autocast=self.autocast)

    @torch.no_grad()
    def _no_grad_logprobs(self, model, batch: PackedBatch) -> Tensor:
        t = self.cfg.train
        full = torch.zeros_like(batch.sampling_logp)
        for idx in micro_batches(batch, torch.arange(len(batch)), t.micro_batch_size, self.micro_tokens):
            sub = batch.select(idx)
            lp, _ = self._logprobs(model, sub)
            full[idx, :lp.shape[1]] = lp
        return full

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

    def advantages(self, batch: PackedBatch, progress: float) -> tuple[PackedBatch, Tensor, dict]:
        """Advantages, then sample selection (which may drop rows) and token selection."""
        a = self.cfg.algo
        adv, metrics = call(self.advantage_fn, batch.rewards, batch.group_ids, batch.loss_mask,
                            available={"entropy": batch.sampling_entropy, "origin": batch.token_origin},
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
            keep = call(self.sample_selector, seq_adv, batch.group_ids, available={"progress": progress},
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
                        available={"adv": adv, "progress": progress}, params=a.token_selector_params)
            batch.train_mask = batch.loss_mask * keep.to(batch.loss_mask.dtype)
        if a.train_shared_prefix_once and batch.token_origin is not None:
            first = first_occurrence(batch.token_origin)
            metrics["tree/deduplicated_tokens"] = float((batch.train_mask * (~first)).sum())
            batch.train_mask = batch.train_mask * first.to(batch.train_mask.dtype)
        return batch, adv, metrics

    def update(self, trajectories: list[Trajectory], step: int, replay_coef: float = 1.0) -> dict[str, float]:
        t, a = self.cfg.train, self.cfg.algo
        progress = self.progress(step)
        batch = pack(trajectories, self.pad_id)
        batch, adv, adv_metrics = self.advantages(batch, progress)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        updates_per_batch = t.epochs * t.mini_batches
        if t.old_logprobs == "sampling":
            old_logp = batch.sampling_logp
        elif updates_per_batch > 1:
            old_logp = self._no_grad_logprobs(self.model, batch)
        else:
            old_logp = None  # one update: the policy before it is the policy in its own forward
        ref_logp = self._no_grad_logprobs(self.ref_model, batch) if a.kl_coef > 0 else None
        turn = per_turn_index(batch.loss_mask)
        # its own generator: turning the probe on or off must not move the methods' random choices
        probe = self._entropy_probe(batch, torch.Generator().manual_seed(self.seed * 1_000_003 + step + 17))
        probe_before = (response_log_softmax(self.model, probe, temperature=self.temperature)
                        if probe is not None else None)

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

        def add(name, value, w=1.0):
            sums[name] = sums.get(name, 0.0) + float(value) * w
            weights[name] = weights.get(name, 0.0) + w

        n_skipped = 0
        grad_norms = []
        for _epoch in range(t.epochs):
            order = torch.randperm(B, generator=gen) if updates_per_batch > 1 else torch.arange(B)
            for mini in torch.tensor_split(order, t.mini_batches):
                if len(mini) == 0:
                    continue
                finite, mini_loss = True, 0.0
                # on-policy rows and replayed rows are two loss terms, each normalised over its own tokens
                for is_replay in (False, True):
                    part = mini[batch.replay[mini] == is_replay]
                    if len(part) == 0:
                        continue
                    coef = replay_coef if is_replay else 1.0
                    norm = AggNorm(tokens=float(batch.train_mask[part].sum().clamp(min=1)), seqs=float(len(part)),
                                   const=float(a.agg_const or self.max_new_tokens))
                    for micro in micro_batches(batch, part, t.micro_batch_size, self.micro_tokens):
                        sub = batch.select(micro)
                        L = sub.resp_ids.shape[1]
                        logp, entropy = self._logprobs(self.model, sub)
                        mask = sub.train_mask
                        old = logp.detach() if old_logp is None else old_logp[micro, :L]
                        ntok = float(mask.sum())
                        weight = None
                        if a.rollout_correction.mode != "none":
                            rc = a.rollout_correction
                            weight, rc_metrics = rollout_correction_weights(old, sub.sampling_logp, mask, mode=rc.mode,
                                                                            cap=rc.cap, low=rc.low)
                            for k, v in rc_metrics.items():
                                add(k, v, ntok)
                        available = {"entropy": entropy, "agg": a.agg, "norm": norm, "weight": weight,
                                     "stats": {k: rows(v, micro, L) for k, v in stats.items()},
                                     "turn": turn[micro, :L], "progress": progress}
                        loss, m = call(self.loss_fn, logp, old, adv[micro, :L], mask, available=available,
                                       params=a.loss_params)
                        for k, v in m.items():
                            add(("replay/" if is_replay else "") + k, v, ntok)
                        loss = coef * loss
                        if ref_logp is not None:
                            kl = kl_penalty(logp, ref_logp[micro, :L], a.kl_estimator)
                            loss = loss + a.kl_coef * agg_loss(kl, mask, a.agg, norm)
                            add("kl", float((kl.detach() * mask).sum() / mask.sum().clamp(min=1)), ntok)
                        if a.entropy_coef:
                            loss = loss - a.entropy_coef * agg_loss(entropy, mask, a.agg, norm)
                        generated = sub.loss_mask  # every generated token, selected for the loss or not
                        if not is_replay:
                            add("policy/entropy",
                                float((entropy.detach() * generated).sum() / generated.sum().clamp(min=1)),
                                float(generated.sum()))
                        mini_loss += float(loss.detach())  # micro losses carry mini-batch normalisers: they sum
                        if not torch.isfinite(loss):
                            finite = False
                            break
                        loss.backward()
                    if not finite:
                        break
                add("loss", mini_loss)
                if finite:
                    params = [p for p in self.model.parameters() if p.requires_grad]
                    gn = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip else float("inf"))
                    if not torch.isfinite(gn):
                        finite = False
                    else:
                        grad_norms.append(float(gn))
                if finite:
                    self.optimizer.step()
                else:
                    n_skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        if probe_before is not None:
            after = response_log_softmax(self.model, probe, temperature=self.temperature)
            metrics.update(entropy_change(probe_before, after))
        metrics.update(adv_metrics)
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/sequences"] = float(batch.resp_ids.shape[0])
        metrics["train/tokens"] = float(batch.train_mask.sum())
        metrics["train/selected_token_frac"] = float(batch.train_mask.sum() / batch.loss_mask.sum().clamp(min=1))
        metrics["train/nonfinite_updates"] = float(n_skipped)
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
