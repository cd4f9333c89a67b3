"""The learner's batch: trajectories as tensors (`pack`), the rows a micro-batch takes (`micro_batches`),
the header its rows all start with (`common_header`), and which tokens several tree branches share
(`token_origin`, `first_occurrence`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.types import Trajectory, shared_prefix


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
    # [B] the rank that trains each row (data parallelism: every rank holds the global batch); None: this one
    owner: Tensor | None = None
    # [B, L] a learned critic's values before the update and its targets (algo.critic); None without one
    old_values: Tensor | None = None
    returns: Tensor | None = None
    # [B] seconds each trajectory's actions took to execute (its tool calls): duration-aware updates
    seconds: Tensor | None = None
    # [B, 3] step-level samples of multi-step episodes (Trajectory.episode_step): episode id (unique in
    # the batch; -1 for a trajectory that is not a step), step index, matched (1/0); None when no row is
    episode_steps: Tensor | None = None
    # [B, L] the positions a learned critic is read at and trained on (algo.critic.level: every generated
    # token, or each row's first); set with old_values
    value_mask: Tensor | None = None
    # [B] index into `adapter_names` of the LoRA adapter each row trains (model.adapters); None when no row names one
    adapter: Tensor | None = None
    adapter_names: tuple[str, ...] = ()
    # [B] words of each row's generated text (MARFT's action log-prob normalisation by words)
    words: Tensor | None = None

    def adapter_of(self) -> str | None:
        """The one adapter every row of this (micro-)batch trains; None when rows name none."""
        if self.adapter is None:
            return None
        used = torch.unique(self.adapter).tolist()
        if len(used) != 1:
            raise ValueError(f"a micro-batch runs one adapter; these rows name {[self.adapter_names[i] for i in used]}")
        return self.adapter_names[used[0]]

    def __post_init__(self):
        if self.train_mask is None:
            self.train_mask = self.loss_mask

    def rows_of(self, rank: int) -> Tensor:
        """The rows rank `rank` trains, in order."""
        if self.owner is None:
            return torch.arange(len(self))
        return (self.owner == rank).nonzero().flatten()

    def __len__(self) -> int:
        return self.resp_ids.shape[0]

    def read_lengths(self, rows: Tensor | None = None) -> Tensor:
        """Per row (of `rows`, default all): response tokens up to and including the last one that
        trains or the critic reads."""
        read = self.train_mask > 0 if rows is None else self.train_mask[rows] > 0
        if self.value_mask is not None:
            read = read | ((self.value_mask if rows is None else self.value_mask[rows]) > 0)
        return (read * torch.arange(1, read.shape[1] + 1)).max(-1).values

    def select(self, idx: Tensor) -> PackedBatch:
        """Rows `idx` with only the prompts they use, each cut after the last token that trains
        (`train_mask`) or that the critic reads (`value_mask`): what comes after it is nothing any
        forward needs (a pruned leaf, a token selector's tail), so the forward does not run it."""
        used, prompt_index = torch.unique(self.prompt_index[idx], return_inverse=True)
        pm = self.prompt_mask[used]
        tp = int(pm.sum(-1).max())
        ends = self.read_lengths(idx)
        L = max(int(ends.max()) if len(ends) else 0, 1)
        cut = (torch.arange(L) < ends.unsqueeze(-1)).to(self.loss_mask.dtype)
        lm = self.loss_mask[idx, :L] * cut
        return PackedBatch(self.prompt_ids[used, -tp:], pm[:, -tp:], prompt_index, self.resp_ids[idx, :L],
                           self.resp_mask[idx, :L] * cut.long(), lm, self.sampling_logp[idx, :L],
                           self.sampling_entropy[idx, :L], self.rewards[idx], self.group_ids[idx],
                           self.fixed_adv[idx], self.replay[idx], self.stats_only[idx], self.train_mask[idx, :L],
                           None if self.token_origin is None else self.token_origin[idx, :L],
                           None if self.owner is None else self.owner[idx],
                           None if self.old_values is None else self.old_values[idx, :L],
                           None if self.returns is None else self.returns[idx, :L],
                           None if self.seconds is None else self.seconds[idx],
                           None if self.episode_steps is None else self.episode_steps[idx],
                           None if self.value_mask is None else self.value_mask[idx, :L],
                           None if self.adapter is None else self.adapter[idx], self.adapter_names,
                           None if self.words is None else self.words[idx])


def pack(trajectories: list[Trajectory], pad_id: int, adapter_order: list[str] | None = None) -> PackedBatch:
    """The one place a list of trajectories becomes tensors. `adapter_order`: the model's LoRA adapters,
    which number the rows' adapters (default: in order of first appearance)."""
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
        token_origin=token_origin(trajectories, L),
        seconds=torch.tensor([sum(c.seconds for c in t.tool_calls) for t in trajectories], dtype=torch.float64),
        episode_steps=episode_steps(trajectories), **adapters(trajectories, adapter_order),
        words=torch.tensor([len(t.text.split()) for t in trajectories], dtype=torch.float32))


def adapters(trajectories: list[Trajectory], order: list[str] | None = None) -> dict:
    """`adapter` and `adapter_names` of the packed batch: names in `order`, or in order of first appearance."""
    if all(t.adapter is None for t in trajectories):
        return {}
    if any(t.adapter is None for t in trajectories):
        raise ValueError("a batch mixes rows that name a LoRA adapter with rows that do not")
    names: dict[str, int] = {name: i for i, name in enumerate(order or [])}
    unknown = sorted({t.adapter for t in trajectories} - set(names)) if order else []
    if unknown:
        raise ValueError(f"rows name LoRA adapters {unknown} the model does not have (it has {order})")
    index = [names.setdefault(t.adapter, len(names)) for t in trajectories]
    return {"adapter": torch.tensor(index, dtype=torch.long), "adapter_names": tuple(names)}


def episode_steps(trajectories: list[Trajectory]) -> Tensor | None:
    """[B, 3] (episode id, step index, matched) per row, episodes numbered by (group, episode) in order
    of first appearance; None when no trajectory is a step of an episode."""
    if all(t.episode_step is None for t in trajectories):
        return None
    ids: dict[tuple[str, str], int] = {}
    rows = []
    for t in trajectories:
        e = t.episode_step
        if e is None:
            rows.append((-1, 0, 1))
        else:
            rows.append((ids.setdefault((t.group, e.episode), len(ids)), e.index, int(e.matched)))
    return torch.tensor(rows, dtype=torch.long)


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


def common_header(batch: PackedBatch, rows: Tensor) -> list[int]:
    """The tokens every prompt of `rows` starts with (a system prompt, few-shot examples), ending
    before the last token of the shortest: the state before a response's first token is the
    prompt's last, which the loss reads, so it must be run with the rows."""
    used = torch.unique(batch.prompt_index[rows]).tolist()
    if not used:
        return []
    lengths = batch.prompt_mask[used].sum(-1).tolist()
    width = batch.prompt_ids.shape[1]
    prompts = [batch.prompt_ids[p, width - n:].tolist() for p, n in zip(used, lengths)]
    first = prompts[0][:min(lengths) - 1]
    return first[:min(shared_prefix(first, other) for other in prompts)]


def micro_batches(batch: PackedBatch, rows: Tensor, max_rows: int, max_tokens: int,
                  shared_prefixes: bool = False, header: int = 0) -> list[Tensor]:
    """Split `rows` (in order) into micro-batches of at most `max_rows` sequences and about `max_tokens`
    tokens run (a single longer row goes alone). What a row costs is what the forward will run for it:
    its response plus its prompt unless the micro-batch already holds that prompt (the dense
    `pack_rows`), or, with `shared_prefixes` (the flat layout, `pack_flat`), its prompt + response
    less the longest prefix it shares with a row already in the micro-batch (a few-shot header, a
    tree prefix). Rows of different LoRA adapters never share a micro-batch: with adapters, `rows` are
    taken adapter by adapter (in order within each). `header` (flat only): the first tokens of every
    row run once outside the micro-batches (`forward.Header`) and cost nothing here."""
    if batch.adapter is not None:
        return [m for a in torch.unique(batch.adapter[rows]).tolist()
                for m in micro_batches(dataclasses.replace(batch, adapter=None), rows[batch.adapter[rows] == a],
                                       max_rows, max_tokens, shared_prefixes, header)]
    prompt_len = batch.prompt_mask.sum(-1).tolist()
    resp_len = batch.read_lengths().tolist()
    prompt_of = batch.prompt_index.tolist()
    width = batch.prompt_ids.shape[1]

    def sequence(r: int) -> list[int]:
        p = prompt_of[r]
        return batch.prompt_ids[p, width - prompt_len[p]:].tolist() + batch.resp_ids[r, :resp_len[r]].tolist()

    def cost(r: int, item, held: list) -> int:
        """Tokens row r adds to a micro-batch holding `held`: prompts (dense) or sequences (flat)."""
        if shared_prefixes:
            return len(item) - max(header, max((shared_prefix(item, other) for other in held), default=0))
        return resp_len[r] + (0 if item in held else prompt_len[item])

    out, current, tokens, held = [], [], 0, []
    for r in rows.tolist():
        item = sequence(r) if shared_prefixes else prompt_of[r]
        c = cost(r, item, held)
        if current and (len(current) >= max_rows or tokens + c > max_tokens):
            out.append(torch.tensor(current))
            current, tokens, held = [], 0, []
            c = cost(r, item, held)
        current.append(r)
        tokens += c
        held.append(item)
    if current:
        out.append(torch.tensor(current))
    return out


