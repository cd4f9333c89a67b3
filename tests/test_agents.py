"""Agent programs through the OpenAI-compatible endpoint, with the real `openai` client and a real
server (no mocks): the API's schema, the key, token-exact recording, exact continuation of chained
calls, batching of concurrent episodes, failing episodes, and training the example agents."""
import asyncio
import json
import logging
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from forkrl.agents import EpisodeRecorder, PolicyEndpoint  # noqa: E402
from forkrl.agents.program import AgentProgramSampler  # noqa: E402
from forkrl.rollout import TorchEngine  # noqa: E402
from forkrl.types import Sample, SamplingParams  # noqa: E402


class SpyEngine:
    """The engine, with every completion it returned kept (what "the engine sampled" means here)."""

    def __init__(self, engine):
        self.engine = engine
        self.sampled: list = []
        self.calls = 0

    def generate(self, requests, seed=None, stop_when=None):
        self.calls += 1
        outs = self.engine.generate(requests, seed=seed)
        self.sampled += [(list(r.prompt_ids), c) for r, o in zip(requests, outs) for c in o]
        return outs

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def served(tiny):
    model, tok = tiny
    spy = SpyEngine(TorchEngine(model, tok, max_batch_size=64))
    endpoint = PolicyEndpoint(spy, tok, EpisodeRecorder(tok), max_tokens=8).start()
    yield endpoint, spy, tok
    endpoint.stop()


def _client(endpoint, episode=None, key=None):
    return openai.OpenAI(base_url=endpoint.base_url(episode), api_key=key or endpoint.api_key, max_retries=0)


def test_responses_follow_the_api_schema(served):
    endpoint, spy, tok = served
    client = _client(endpoint, "schema")
    reply = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=6, temperature=0.7, n=2, stop=["\n\n"])
    assert reply.object == "chat.completion" and len(reply.choices) == 2
    assert [c.index for c in reply.choices] == [0, 1]
    for c in reply.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == sum(len(call.completion.token_ids)
                                                for call in endpoint.recorder.episodes["schema"])
    assert reply.usage.prompt_tokens == len(endpoint.recorder.episodes["schema"][0].prompt_ids)
    assert [m.id for m in client.models.list().data] == ["forkrl-policy"]
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_a_request_without_the_runs_key_is_refused(served):
    endpoint, _, _ = served
    with pytest.raises(openai.AuthenticationError):
        _client(endpoint, key="forkrl-guessed").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
    request = urllib.request.Request(endpoint.base_url() + "/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 401
    assert endpoint.host == "127.0.0.1"


def test_recorded_ids_are_the_engines_sampled_ids(served):
    endpoint, spy, tok = served
    before = len(spy.sampled)
    reply = _client(endpoint, "exact").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8)
    (prompt, sampled), = spy.sampled[before:]
    call, = endpoint.recorder.episodes["exact"]
    assert call.prompt_ids == prompt and call.completion.token_ids == sampled.token_ids
    assert call.completion.logprobs == sampled.logprobs and call.completion.entropies == sampled.entropies
    assert reply.choices[0].message.content == tok.decode(sampled.token_ids, skip_special_tokens=True)


def test_a_three_call_episode_trains_on_exactly_the_tokens_sampled(served):
    """Each follow-up continues from the exact ids of the earlier calls (the token-in, token-out test
    of the tool protocol, through HTTP): one trajectory whose trained tokens are the sampled ones."""
    endpoint, spy, tok = served
    client = _client(endpoint, "chain")
    before = len(spy.sampled)
    messages = [{"role": "user", "content": "Start a story."}]
    for turn in range(3):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=6)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "tool" if turn == 0 else "user", "content": f"observation {turn}"}]
    sampled = spy.sampled[before:]
    calls = endpoint.recorder.pop("chain")
    assert [c.extends for c in calls] == [None, 0, 1]
    traj, = EpisodeRecorder.trajectories(calls)
    trained = [x for x, m in zip(traj.tokens, traj.loss_mask) if m]
    assert trained == [t for _, c in sampled for t in c.token_ids]
    # the whole sequence is the last call's prompt (exact ids of everything before) + its completion
    last_prompt, last = sampled[-1]
    assert traj.prompt_ids + traj.tokens == last_prompt + last.token_ids
    assert [lp for lp, m in zip(traj.logprobs, traj.loss_mask) if m] == [x for _, c in sampled for x in c.logprobs]
    assert traj.turns == 3
    # and each later prompt starts with the earlier prompt + its sampled completion, token for token
    for (p0, c0), (p1, _) in zip(sampled, sampled[1:]):
        assert p1[:len(p0) + len(c0.token_ids)] == p0 + c0.token_ids


def test_an_edited_reply_starts_a_new_segment(served):
    endpoint, _, _ = served
    client = _client(endpoint, "edited")
    messages = [{"role": "user", "content": "Say something."}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    splits = endpoint.recorder.splits
    messages += [{"role": "assistant", "content": "something the policy did not write"},
                 {"role": "user", "content": "and?"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    calls = endpoint.recorder.pop("edited")
    assert [c.extends for c in calls] == [None, None] and len(EpisodeRecorder.trajectories(calls)) == 2
    assert endpoint.recorder.splits == splits   # not an extension of the recorded reply at all


def _samples(n):
    return [Sample(id=f"row{i}", prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n)]


async def one_call(task_row, client):
    reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": task_row["prompt"]}])
    return float(len(reply.choices[0].message.content) % 2)


def raises_on_row3(task_row, client):
    if task_row["id"] == "row3":
        raise RuntimeError("the agent's tool broke")
    if task_row["id"] == "row5":
        import sys
        sys.exit(1)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": task_row["prompt"]}])
    return 0.5


async def never_returns(task_row, client):
    await asyncio.sleep(60)


def test_an_episode_past_its_deadline_is_dropped(tiny):
    import time
    model, tok = tiny
    sampler = AgentProgramSampler("tests.test_agents:never_returns", episode_timeout_s=0.5)
    try:
        start = time.perf_counter()
        results = sampler.run_episodes(TorchEngine(model, tok), tok, _samples(2), SamplingParams(max_tokens=4), seed=0)
        assert time.perf_counter() - start < 5
        assert [r.error for rs in results for r in rs] == ["no result within 0.5 s (episode_timeout_s)"] * 2
    finally:
        sampler.close()


def test_32_concurrent_episodes_share_engine_calls(tiny):
    model, tok = tiny
    spy = SpyEngine(TorchEngine(model, tok, max_batch_size=64))
    sampler = AgentProgramSampler("tests.test_agents:one_call", concurrency=32)
    try:
        results = sampler.run_episodes(spy, tok, _samples(32), SamplingParams(temperature=1.0, max_tokens=8), seed=0)
        assert all(r.error is None and len(r.trajectories) == 1 for rs in results for r in rs)
        assert sampler.endpoint.requests == 32
        assert spy.calls < 32, spy.calls      # batched: fewer engine calls than requests
    finally:
        sampler.close()


def test_a_failing_episode_is_dropped_and_named(tiny, caplog):
    model, tok = tiny
    sampler = AgentProgramSampler("tests.test_agents:raises_on_row3", concurrency=8)
    try:
        with caplog.at_level(logging.WARNING, logger="forkrl"):
            results = sampler.run_episodes(TorchEngine(model, tok), tok, _samples(6),
                                           SamplingParams(temperature=1.0, max_tokens=6), seed=0)
        errors = {i: r.error for i, rs in enumerate(results) for r in rs if r.error}
        assert set(errors) == {3, 5}
        assert "RuntimeError: the agent's tool broke" in errors[3] and "SystemExit" in errors[5]
        assert "sample row3" in caplog.text and "the agent's tool broke" in caplog.text
        assert all(r.reward == 0.5 for i, rs in enumerate(results) for r in rs if i not in errors)
    finally:
        sampler.close()


@pytest.mark.parametrize("program", ["single_call", "two_step", "two_role"])
def test_the_example_agents_train_on_tiny_random(tmp_path, program):
    from forkrl.config import build_config
    from forkrl.train import Trainer
    cfg = build_config({
        "output_dir": str(tmp_path / program), "model": {"name": "tiny-random"},
        "task": {"dataset": "chain_sum", "train_size": 40, "eval_size": 4, "rewards": [{"name": "episode_reward"}]},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 8, "sampler": "agent_program",
                    "sampler_params": {"program": f"examples/agents/{program}.py:run"}},
        "train": {"steps": 2, "lr": 1e-3}, "eval": {"at_start": False}, "log": {"progress": False, "tensorboard": False}})
    trainer = Trainer(cfg)
    summary = trainer.train()
    rows = trainer.history
    assert [r["sampler/episodes"] for r in rows] == [8.0, 8.0] and all(r["sampler/episodes_failed"] == 0 for r in rows)
    expected = {"single_call": 1, "two_step": 1, "two_role": 2}[program]   # trajectories per episode
    assert all(r["sampler/trajectories"] == 8 * expected for r in rows)
    assert "eval/reward" in summary["after"]
    if program == "two_step":   # the second call continued the first: one multi-turn trajectory each
        assert all(r["sampler/segments_split"] == 0 for r in rows)
        assert [t.turns for t in trainer.loop.last_generated] == [2] * 8
    trainer.source.sampler.close()
    asyncio.set_event_loop(None)
