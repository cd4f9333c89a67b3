"""Training an agent program as it is: any function that talks to the policy through the OpenAI client.

    # my_agent.py
    async def run(task_row, client):                      # or a plain `def` with a sync client
        reply = await client.chat.completions.create(
            model="forkrl-policy", messages=[{"role": "user", "content": task_row["prompt"]}])
        return 1.0 if task_row["answer"] in reply.choices[0].message.content else 0.0

    rollout: {sampler: agent_program, sampler_params: {program: "my_agent:run"}}
    task:    {rewards: [{name: episode_reward}]}

The `agent_program` sampler runs `samples_per_prompt` episodes of the program per prompt, up to
`concurrency` at a time, each with a client (`openai.AsyncOpenAI` for an async function, else
`openai.OpenAI`) pointed at its own episode path of a `PolicyEndpoint`. The endpoint batches
the episodes' requests into the engine and records every call (`EpisodeRecorder`). Each episode's
calls become trajectories: one per chain of calls that extend each other, so a multi-step agent
trains as one multi-turn trajectory. The program's return value is the episode's reward, given to
reward functions as the `episode_reward` column (the built-in `episode_reward` reward passes it
through). An episode that raises, returns something that is not a finite number, or runs past
`episode_timeout_s` is dropped and named in the log (`sampler/episodes_failed`); it never stops the run.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from forkrl.agents.endpoint import PolicyEndpoint
from forkrl.agents.recorder import EpisodeRecorder
from forkrl.registry import register_sampler
from forkrl.types import SamplingParams, Trajectory

log = logging.getLogger("forkrl")


@dataclasses.dataclass
class EpisodeResult:
    episode: str
    reward: float | None
    trajectories: list[Trajectory]
    error: str | None = None
    seconds: float = 0.0


def task_row(sample) -> dict:
    """What the program gets for a prompt: the row's columns, its prompt (text, and messages when the
    data gave chat messages) and its answer."""
    row = dict(sample.columns)
    row.update(prompt=sample.prompt, answer=sample.answer, id=sample.id)
    if sample.messages is not None:
        row["messages"] = sample.messages
    return row


@register_sampler("agent_program")
class AgentProgramSampler:
    """Episodes of a user's OpenAI-client program, trained on the exact tokens the endpoint served."""

    def __init__(self, program: str, concurrency: int = 32, episode_timeout_s: float = 300.0):
        from forkrl.io import load_function
        try:
            self.fn = load_function(program)
        except (ImportError, AttributeError, ValueError, OSError, SyntaxError) as e:
            raise ValueError(f"program: {e}") from None
        if not callable(self.fn):
            raise ValueError(f"program: {program} is not a function")
        self.program = program
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.concurrency, self.episode_timeout_s = concurrency, episode_timeout_s
        self.endpoint: PolicyEndpoint | None = None
        self._ids = itertools.count()
        # the openai client logs every HTTP request at INFO through httpx: thousands per step
        logging.getLogger("httpx").setLevel(max(logging.getLogger("httpx").level, logging.WARNING))

    # -- the sampler interface ----------------------------------------------------------------------
    def sample(self, engine, prompts, params: SamplingParams, seed: int, ctx):
        if ctx.samples is None:
            raise ValueError("the agent_program sampler needs the task's samples")
        ep = self._endpoint(engine, ctx.tokenizer, params, seed, ctx.version)
        calls_before, splits_before = ep.engine_calls, ep.recorder.splits
        results = self.run_episodes(engine, ctx.tokenizer, ctx.samples, params, seed, ctx.version)
        groups, failed = [], 0
        for sample, per_sample in zip(ctx.samples, results):
            group = []
            for r in per_sample:
                if r.error is not None:
                    failed += 1
                    continue
                with_reward = dataclasses.replace(sample, columns={**sample.columns, "episode_reward": r.reward})
                for t in r.trajectories:
                    t.sample = with_reward
                    group.append(t)
            groups.append(group)
        if not any(groups):
            first = next(r for rs in results for r in rs if r.error)
            raise RuntimeError(f"every episode of the agent program {self.program} failed; the first, "
                               f"{first.episode}: {first.error}")
        # reported as sampler/<name>, summed over the step's rollout calls
        extra = {"episodes": float(sum(len(rs) for rs in results)), "episodes_failed": float(failed),
                 "engine_calls": float(self.endpoint.engine_calls - calls_before),
                 "segments_split": float(self.endpoint.recorder.splits - splits_before)}
        return groups, extra

    def evaluation_rollout(self, engine, tokenizer, version: int = 0):
        """`generate(prompt_ids, samples, params, seed)` for held-out evaluation: episodes of the
        program, each trajectory carrying its episode's reward (`Trajectory.reward`)."""
        def generate(prompts, samples, params, seed, groups=None):
            out = []
            for per_sample in self.run_episodes(engine, tokenizer, samples, params, seed, version):
                trajs = []
                for r in per_sample:
                    t = _final(r)
                    t.reward = r.reward if r.reward is not None else 0.0
                    trajs.append(t)
                out.append(trajs)
            return out
        return generate

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None

    # -- episodes -----------------------------------------------------------------------------------
    def _endpoint(self, engine, tokenizer, params: SamplingParams, seed: int, version: int) -> PolicyEndpoint:
        if self.endpoint is None or self.endpoint.engine is not engine:
            self.close()
            self.endpoint = PolicyEndpoint(engine, tokenizer, EpisodeRecorder(tokenizer), seed=seed).start()
        ep = self.endpoint
        ep.max_tokens, ep.fixed_temperature, ep.version, ep.seed = params.max_tokens, params.temperature, version, seed
        return ep

    def run_episodes(self, engine, tokenizer, samples, params: SamplingParams, seed: int, version: int = 0
                     ) -> list[list[EpisodeResult]]:
        """`params.n` episodes per sample, concurrently; results per sample, in order."""
        ep = self._endpoint(engine, tokenizer, params, seed, version)
        jobs = [(i, f"e{next(self._ids)}", task_row(s)) for i, s in enumerate(samples) for _ in range(params.n)]
        results = asyncio.run(self._run_all(ep, jobs))
        per_sample: list[list[EpisodeResult]] = [[] for _ in samples]
        for (i, _, _), r in zip(jobs, results):
            per_sample[i].append(r)
            if r.error is not None:
                log.warning("agent episode %s (sample %s) dropped: %s", r.episode, samples[i].id, r.error)
        return per_sample

    async def _run_all(self, ep: PolicyEndpoint, jobs) -> list[EpisodeResult]:
        import openai
        sem = asyncio.Semaphore(self.concurrency)
        pool = None if self.is_async else ThreadPoolExecutor(max_workers=self.concurrency,
                                                             thread_name_prefix="forkrl-agent")

        async def one(episode: str, row: dict) -> EpisodeResult:
            async with sem:
                start = time.perf_counter()
                reward, error = None, None
                kwargs = dict(base_url=ep.base_url(episode), api_key=ep.api_key, max_retries=0,
                              timeout=self.episode_timeout_s)
                try:
                    if self.is_async:
                        async with openai.AsyncOpenAI(**kwargs) as client:
                            value = await asyncio.wait_for(self.fn(row, client), self.episode_timeout_s)
                    else:
                        client = openai.OpenAI(**kwargs)
                        try:
                            value = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                                pool, self.fn, row, client), self.episode_timeout_s)
                        finally:
                            client.close()
                    reward, error = _as_reward(value)
                except asyncio.TimeoutError:
                    error = f"no result within {self.episode_timeout_s:g} s (episode_timeout_s)"
                except (KeyboardInterrupt, asyncio.CancelledError):
                    raise
                except BaseException as e:  # noqa: BLE001 - sys.exit in a program ends its episode, not the run
                    error = f"{type(e).__name__}: {e}"
                calls = ep.recorder.pop(episode)
                if error is None and not calls:
                    error = "the program made no call to the endpoint"
                trajs = EpisodeRecorder.trajectories(calls) if error is None else []
                return EpisodeResult(episode, reward, trajs, error, time.perf_counter() - start)

        try:
            return await asyncio.gather(*(one(e, row) for _, e, row in jobs))
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _as_reward(value) -> tuple[float | None, str | None]:
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return None, f"returned {value!r}, not a number"
    if not math.isfinite(reward):
        return None, f"returned {value!r}"
    return reward, None


def _final(r: EpisodeResult) -> Trajectory:
    """The trajectory an evaluation scores: the episode's last chain (an empty one if it failed)."""
    if r.trajectories:
        return r.trajectories[-1]
    return Trajectory(prompt_ids=[], tokens=[], logprobs=[], entropies=[], loss_mask=[], group="", text="",
                      finish="error")
