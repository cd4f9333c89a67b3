"""BranchGRPO's branching rollout on token trees (Li et al., 2025, arXiv 2509.06040; algorithms.md
§23 b step 1, adapted to language models as §23 f describes).

One root path per prompt. A path that reaches a split depth (a count of response tokens, `splits`)
splits into `branches` paths: it goes on, and k − 1 new paths start from its first `depth` tokens.
Away from the split depths a path has one child. With S split depths a prompt's tree has k^|S|
leaves; with fewer members n, the tree is cut in level order (BranchGRPO grows it level by level):
a member's rank is Σ_j c_j·k^j over the split depths j, c_j = 0 where it went on and the child's
number 1 … k − 1 where it was forked, and only ranks below n are made, however the engine orders
the work. A path that ends before a split depth does not split there: the members its forks would
have led to are fresh samples from the prompt, started as soon as it ends.

Every path is one request in the engine's continuous batch (`open_stream`): when a running path
reaches a split depth its forks enter the batch at once and copy the shared states from its slot
(nothing is prefilled again), while it goes on. On an engine that shows no partial progress, a
path's forks are made when it returns, from its tokens: the same tree, in more rounds. Members
record `parent` and `branch_at`, so the learner runs each shared prefix once, and
`advantage: branch_depth` gives BranchGRPO's depth-wise advantages (§23 b step 3).

With `split_at: turns` (tool-using episodes) a split point is a turn boundary instead, §23 f's other
example: after its j-th turn's tool results, for j in `splits`, an episode goes on and k − 1 exact
copies continue on their own, through the episodes' one continuous batch (`agent.run_episodes`).

Split depths. BranchGRPO splits diffusion steps {0, 3, 6, 9} of 20 (k = 2, 16 leaves). The default
here is that schedule scaled to the response budget: depth j·0.15·max_tokens for as many splits as
k^|S| ≥ n needs. The depths set how much of a path its group shares: a late split shares more
tokens (cheaper to sample and to train) and its branches differ over fewer (§23 f leaves the
choice open).
"""
from __future__ import annotations

import dataclasses
import math

from forkrl.rollout.samplers import register_sampler
from forkrl.types import GenerationRequest, Trajectory


def levels(n: int, branches: int) -> int:
    """How many split levels a tree needs for n leaves: the least |S| with branches^|S| ≥ n."""
    return max(math.ceil(math.log(n) / math.log(branches) - 1e-9), 1) if n > 1 else 0


def default_splits(n: int, branches: int, max_tokens: int) -> list[int]:
    """BranchGRPO's schedule, every 3 of 20 steps from the first, scaled to `max_tokens`: as many
    split depths as `branches`^|S| ≥ n needs (fewer where a short budget rounds two to one)."""
    return sorted({round(j * 0.15 * max_tokens) for j in range(levels(n, branches))})


@dataclasses.dataclass(eq=False)
class _Path:
    head: list[int]          # the tokens it shares with its parent (the parent's first `branch_at`)
    head_logprobs: list[float]
    head_entropies: list[float]
    parent: int | None       # index of the parent in the group
    next_split: int          # index into the split depths of the next one it may split at
    rank: int                # its leaf's place in the level order of the full tree
    completion: object = None


@register_sampler("branchgrpo")
class BranchGRPOSampler:
    def __init__(self, branches: int = 2, splits: list[int] | None = None, split_at: str = "tokens"):
        if branches < 2:
            raise ValueError(f"branchgrpo: branches must be at least 2 (paths per split), got {branches}")
        if split_at not in ("tokens", "turns"):
            raise ValueError(f"branchgrpo: split_at must be 'tokens' or 'turns', got {split_at!r}")
        least = 1 if split_at == "turns" else 0
        if splits is not None and (any(s < least for s in splits) or list(splits) != sorted(set(splits))):
            raise ValueError(f"branchgrpo: splits must be increasing {split_at} >= {least}, got {list(splits)}")
        self.branches, self.split_at = branches, split_at
        self.splits = None if splits is None else list(splits)

    def sample(self, engine, prompts, params, seed, ctx):
        if (ctx.env is not None) != (self.split_at == "turns"):
            raise ValueError("branchgrpo: split_at 'turns' splits episodes after tool results and needs env "
                             "(tools); without tools split_at is 'tokens'")
        if self.split_at == "turns":
            return self._sample_turns(engine, prompts, params, seed, ctx)
        from forkrl.rollout.engine.stream import open_stream
        n, k = params.n, self.branches
        splits = [s for s in (self.splits if self.splits is not None else default_splits(n, k, params.max_tokens))
                  if s < params.max_tokens]
        leaves = min(n, k ** len(splits))
        stream = open_stream(engine, seed)
        groups: list[list[_Path]] = [[] for _ in prompts]
        live: dict[int, tuple[int, _Path]] = {}    # running paths by request
        fills: dict[int, int] = {}                 # fresh-sample requests: prompt

        def start(i: int, path: _Path) -> None:
            rid = stream.add(GenerationRequest(prompts[i] + path.head, dataclasses.replace(
                params, n=1, max_tokens=params.max_tokens - len(path.head)), keep_kv=True))
            groups[i].append(path)
            live[rid] = (i, path)
            split(i, path, [], [], [], running=True)   # a split at the depth it starts from

        def split(i: int, path: _Path, ids, logprobs, entropies, running: bool) -> None:
            """Fork at every split depth the path has reached: it holds more tokens than the depth, or
            exactly as many and is still going (the depth's last token is not its end)."""
            while path.next_split < len(splits):
                own = splits[path.next_split] - len(path.head)
                if not (len(ids) > own or (len(ids) == own and running)):
                    return
                level, path.next_split = path.next_split, path.next_split + 1
                for c in range(1, k):
                    if path.rank + c * k ** level < leaves:
                        start(i, _Path(path.head + list(ids[:own]), path.head_logprobs + list(logprobs[:own]),
                                       path.head_entropies + list(entropies[:own]), parent=groups[i].index(path),
                                       next_split=path.next_split, rank=path.rank + c * k ** level))

        def fill(i: int, count: int) -> None:
            if count > 0:
                fills[stream.add(GenerationRequest(prompts[i], dataclasses.replace(params, n=count)))] = i

        for i in range(len(prompts)):
            start(i, _Path([], [], [], parent=None, next_split=0, rank=0))
            fill(i, n - leaves)   # more members than the tree has leaves
        fresh: list[list] = [[] for _ in prompts]
        while not stream.done:
            for rid, comps in stream.step():
                if rid in fills:
                    fresh[fills[rid]] += comps
                    continue
                i, path = live.pop(rid)
                c = path.completion = comps[0]
                split(i, path, c.token_ids, c.logprobs, c.entropies, running=False)
                if path.next_split < len(splits):
                    # it ended before these depths: the members its forks would have led to (the ranks
                    # that descend from it through them) are fresh samples, started now
                    fill(i, len(range(path.rank + k ** path.next_split, leaves, k ** path.next_split)))
            for rid, (i, path) in list(live.items()):
                running = stream.progress(rid)
                if running:
                    q = running[0]
                    split(i, path, q.ids, q.logprobs, q.entropies, running=q.finish is None)
        out = []
        for i, p in enumerate(prompts):
            members = []
            for path in groups[i]:
                c = path.completion
                tokens = path.head + c.token_ids
                members.append(Trajectory(
                    prompt_ids=list(p), tokens=tokens, logprobs=path.head_logprobs + c.logprobs,
                    entropies=path.head_entropies + c.entropies, loss_mask=[1] * len(tokens), group="",
                    policy_version=[ctx.version] * len(tokens), finish=c.finish,
                    parent=path.parent, branch_at=None if path.parent is None else len(path.head),
                    text=engine.tokenizer.decode(tokens[:-1] if c.finish == "eos" else tokens, skip_special_tokens=False)))
            members += [Trajectory.from_completion(p, c, group="", version=ctx.version) for c in fresh[i]]
            out.append(members)
        return out, {"branchgrpo/tree_members": float(sum(len(g) for g in groups)),
                     "branchgrpo/filled": float(sum(map(len, fresh)))}

    def _sample_turns(self, engine, prompts, params, seed, ctx):
        """Split at turn boundaries (§23 f): after its j-th turn's tool results, for j in `splits`
        (default 1, 2, ... as many as k^|S| ≥ n needs), an episode goes on and k − 1 exact copies
        continue on their own. Ranks, the level-order cut and the fresh episodes for lost leaves are
        as with token depths."""
        from forkrl.rollout.agent import new_episode, run_episodes
        from forkrl.rollout.arpo import assemble
        n, k = params.n, self.branches
        splits = self.splits if self.splits is not None else list(range(1, levels(n, k) + 1))
        leaves = min(n, k ** len(splits))
        groups = [[new_episode(p)] + [new_episode(p) for _ in range(n - leaves)] for p in prompts]
        where = {id(g[0]): (0, 0) for g in groups}   # tree members: (rank, index of the next split)
        parents: dict[int, object] = {}
        count = {"filled": float(sum(len(g) - 1 for g in groups))}

        def after_turn(i: int, e) -> list:
            if id(e) not in where:
                return []   # a fresh episode
            rank, level = where[id(e)]
            new = []
            if not e.done and level < len(splits) and e.turns == splits[level]:
                for c in range(1, k):
                    if rank + c * k ** level < leaves:
                        child = e.fork()
                        parents[id(child)] = e
                        where[id(child)] = (rank + c * k ** level, level + 1)
                        new.append(child)
                level += 1
            if e.done and level < len(splits):
                # it ended before these turns: the members its copies would have led to are fresh
                new += [new_episode(e.traj.prompt_ids) for _ in range(rank + k ** level, leaves, k ** level)]
                count["filled"] += len(range(rank + k ** level, leaves, k ** level))
                level = len(splits)
            where[id(e)] = (rank, level)
            return new

        run_episodes(engine, ctx.env, ctx.tokenizer, groups, params, seed, ctx.version, after_turn)
        return assemble(groups, parents, n), {"branchgrpo/tree_members": float(len(where)),
                                              "branchgrpo/filled": count["filled"]}
