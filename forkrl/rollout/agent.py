"""Multi-turn rollouts with tools: generate until a tool call closes, run it, append the observation,
continue — until an answer, EOS, the turn or tool-call limit, or the token budget.

`run_episodes` drives episodes through one continuous batch (`engine.stream`): each episode's next
turn is submitted when its own tool results are in, not when the slowest episode's turn ends.

`Trajectory.text` is what the policy wrote (its turns, joined), which rewards read; the observations
are in `tokens` only. Token-in, token-out: each turn continues from the exact token ids of the prompt, of everything the
policy sampled and of the observations, so the tokens trained on are the tokens sampled (nothing is
decoded and re-encoded). Observation tokens carry loss mask 0, log-prob 0 and entropy nan.
"""
from __future__ import annotations

import dataclasses
import math

from forkrl.envs.env import ToolEnv
from forkrl.types import GenerationRequest, SamplingParams, ToolCall, Trajectory


@dataclasses.dataclass(eq=False)
class Episode:
    """One trajectory being built turn by turn."""
    traj: Trajectory
    tool_calls: int = 0
    turns: int = 0
    done: bool = False
    last_segment: list[float] = dataclasses.field(default_factory=list)  # entropies of the last turn's tokens
    last_top: list | None = None     # and their top-k candidates, when the params ask for them
    h_init: float | None = None      # tree samplers' entropy bookkeeping
    h_now: float | None = None

    def fork(self) -> Episode:
        """An exact copy that continues independently (tree samplers)."""
        t = self.traj
        copy = dataclasses.replace(t, tokens=list(t.tokens), logprobs=list(t.logprobs), entropies=list(t.entropies),
                                   loss_mask=list(t.loss_mask), policy_version=list(t.policy_version),
                                   tool_calls=list(t.tool_calls), rewards={}, branch_at=len(t.tokens))
        return Episode(copy, self.tool_calls, self.turns, self.done, list(self.last_segment), self.last_top)


def new_episode(prompt_ids: list[int], group: str = "", sample=None) -> Episode:
    return Episode(Trajectory(prompt_ids=list(prompt_ids), tokens=[], logprobs=[], entropies=[], loss_mask=[],
                              group=group, policy_version=[], sample=sample, finish="length"))


def turn_request(e: Episode, env: ToolEnv, params: SamplingParams) -> GenerationRequest:
    """The request for an episode's next turn: continue its exact tokens until a tool call closes."""
    b = env.budget
    stop = list(dict.fromkeys([*params.stop, *env.protocol.stop_strings()]))
    left = min(params.max_tokens, b.max_total_tokens - len(e.traj.tokens))
    return GenerationRequest(e.traj.prompt_ids + e.traj.tokens,
                             dataclasses.replace(params, n=1, max_tokens=max(left, 1), stop=stop),
                             keep_kv=e.turns + 1 < b.max_turns)  # the next turn continues it


def record_turn(e: Episode, c, env: ToolEnv, version: int) -> list:
    """Append a finished turn to its episode; returns the tool calls to run (none when it ended)."""
    b = env.budget
    t = e.traj
    t.tokens += c.token_ids
    t.logprobs += c.logprobs
    t.entropies += c.entropies
    t.loss_mask += [1] * len(c.token_ids)
    t.policy_version += [version] * len(c.token_ids)
    t.text += c.text
    e.last_segment, e.last_top = list(c.entropies), c.top_logprobs
    e.turns += 1
    calls = env.protocol.parse_calls(c.text) if c.finish == "stop" else []
    if c.finish != "stop" or env.protocol.has_answer(c.text) or not calls:
        e.done, t.finish = True, ("answer" if env.protocol.has_answer(c.text) else c.finish)
        return []
    if len(t.tokens) >= b.max_total_tokens:
        e.done, t.finish = True, "length"
    elif e.turns >= b.max_turns:
        e.done, t.finish = True, "turns"
    elif e.tool_calls + len(calls) > b.max_tool_calls:
        e.done, t.finish = True, "tool_budget"
    return [] if e.done else calls


def run_tools(env: ToolEnv, tokenizer, pending: list[tuple[Episode, list]], version: int) -> None:
    """Run the calls of every episode in one `env.execute` and append each episode's observation."""
    b = env.budget
    flat = [(e, c) for e, calls in pending for c in calls]
    results = env.execute([c for _, c in flat]) if flat else []
    per_episode: dict[int, list] = {}
    for (e, c), r in zip(flat, results):
        per_episode.setdefault(id(e), []).append((c, r))
    for e, _ in pending:
        if id(e) not in per_episode:
            continue
        t = e.traj
        pairs = per_episode[id(e)]
        text = env.protocol.format_observation([r.text for _, r in pairs])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:b.max_observation_tokens]
        ids = ids[:max(b.max_total_tokens - len(t.tokens), 0)]
        start = len(t.tokens)
        t.tokens += ids
        t.logprobs += [0.0] * len(ids)
        t.entropies += [math.nan] * len(ids)
        t.loss_mask += [0] * len(ids)
        t.policy_version += [version] * len(ids)
        for c, r in pairs:
            t.tool_calls.append(ToolCall(c.tag, (start, start + len(ids)), ok=r.ok, seconds=r.seconds, cost=r.cost,
                                         error=r.error))
        e.tool_calls += len(pairs)
        if len(t.tokens) >= b.max_total_tokens:
            e.done, t.finish = True, "length"


def run_episodes(engine, env: ToolEnv, tokenizer, groups: list[list[Episode]], params: SamplingParams,
                 seed: int, version: int = 0, after_turn=None, when_drained=None, ahead=None) -> None:
    """Every episode of every group to its end, through one continuous batch: an episode's next turn
    enters the engine as soon as its tool results are in, while the others are still generating.

    Hooks (the tree samplers' branching) run in the order turns finish:
      after_turn(group_index, episode) -> new episodes, after each finished turn (tool results
        appended); they join the group and start at once;
      when_drained(group_index) -> new episodes, when a group has nothing running;
      ahead(group_index) -> the episodes group i keeps in reserve now, asked at the start and after
        each of the group's turns and drains: new ones start, ones no longer listed are cancelled
        (what they decoded stays counted in the engine's statistics). A reserve writes its first
        turn and then waits outside the group until `when_drained` returns it; only then are its
        tool calls run and `after_turn` called, so every decision sees the group as it stands when
        the episode joins. Once the group has drained for good, the rest are cancelled.
    """
    from forkrl.rollout.engine.stream import open_stream
    stream = open_stream(engine, seed)
    running: dict[int, tuple[int, Episode]] = {}
    busy = [0] * len(groups)
    reserve: list[dict[int, int | None]] = [{} for _ in groups]  # id -> request id (None: its first turn is written)
    written: dict[int, object] = {}                             # a reserve's first turn, waiting to be taken
    closed = [False] * len(groups)

    def start(i: int, e: Episode) -> None:
        running[stream.add(turn_request(e, env, params))] = (i, e)
        busy[i] += 1

    def join(i: int, new: list[Episode], turned: list) -> None:
        groups[i] += new
        for x in new:
            if id(x) not in reserve[i]:
                start(i, x)
                continue
            busy[i] += 1
            if reserve[i].pop(id(x)) is None:   # its first turn is written: it counts as finishing now
                turned.append((i, x, written.pop(id(x))))

    def drop(i: int, key: int) -> None:
        rid = reserve[i].pop(key)
        written.pop(key, None)
        if rid is not None:
            stream.cancel(rid)
            running[rid] = (-1, running[rid][1])   # its aborted remainder is dropped on return

    def close(i: int) -> None:
        closed[i] = True
        for key in list(reserve[i]):
            drop(i, key)

    def settle(turned: list) -> None:
        while turned:
            run_tools(env, tokenizer, [(e, record_turn(e, c, env, version)) for _, e, c in turned], version)
            for i, e, _ in turned:
                busy[i] -= 1
                new = after_turn(i, e) if after_turn is not None else []
                groups[i] += new
                for x in [e, *new]:
                    if not x.done:
                        start(i, x)
            touched, turned = sorted({i for i, _, _ in turned}), []
            for i in touched:
                while busy[i] == 0 and not closed[i]:
                    new = when_drained(i) if when_drained is not None else []
                    if not new:
                        close(i)
                        break
                    join(i, new, turned)
                prepare(i)

    def prepare(i: int) -> None:
        if ahead is None or closed[i]:
            return
        keep = {id(x): x for x in ahead(i)}
        for key in [k for k in reserve[i] if k not in keep]:
            drop(i, key)
        for key, x in keep.items():
            if key not in reserve[i]:
                rid = stream.add(turn_request(x, env, params))
                running[rid], reserve[i][key] = (i, x), rid

    for i, g in enumerate(groups):
        for e in g:
            if not e.done:
                start(i, e)
        prepare(i)
    while not stream.done:
        finished = stream.step()
        turned = []
        for rid, (c,) in finished:
            i, e = running.pop(rid)
            if i < 0:
                continue
            if reserve[i].get(id(e)) == rid:   # a reserve: it waits for the group to take it
                reserve[i][id(e)], written[id(e)] = None, c
            else:
                turned.append((i, e, c))
        settle(turned)


def finish(episodes: list[Episode]) -> list[Trajectory]:
    for e in episodes:
        e.traj.turns = e.turns
        if not e.done:
            e.traj.finish = "turns"
    return [e.traj for e in episodes]


def multi_turn_rollout(engine, env: ToolEnv, tokenizer, prompt_ids: list[list[int]], groups: list[str],
                       samples: list, params: SamplingParams, seed: int, version: int = 0) -> list[Trajectory]:
    """`params.n` independent episodes per prompt; returns trajectories grouped by prompt in order."""
    episodes = [[new_episode(p, g, s) for _ in range(params.n)] for p, g, s in zip(prompt_ids, groups, samples)]
    run_episodes(engine, env, tokenizer, episodes, params, seed, version)
    return finish([e for g in episodes for e in g])


def roc_penalty(traj: Trajectory, answer_tag: str = "answer") -> float:
    """GRPO-RoC's penalty of a trajectory (algorithms.md §13.6): p_err + p_fmt, with
    p_err = the share of its tool calls that failed (0.5 when it made none) and
    p_fmt = min((answer blocks - 1) / turns, 1), or 1 when the answer tags are missing or unbalanced."""
    calls = traj.tool_calls
    p_err = sum(not c.ok for c in calls) / len(calls) if calls else 0.5
    opened, closed = traj.text.count(f"<{answer_tag}>"), traj.text.count(f"</{answer_tag}>")
    if opened == 0 or opened != closed:
        p_fmt = 1.0
    else:
        p_fmt = min((opened - 1) / max(traj.turns, 1), 1.0)
    return p_err + p_fmt
