"""Router-R1 (algorithms.md §20): the format cases, EM/F1, the cost percentile transform and the
total-reward rule by hand; the route tool's replies and prices; the reward term with its buffer."""
import json

import pytest

from forkrl.collect.collector import CollectContext
from forkrl.collect.reward_terms import router_r1
from forkrl.config import ConfigError, load_config
from forkrl.envs.router import (
    cost_reward,
    exact_match,
    format_problem,
    parse_route,
    token_f1,
    total_reward,
)
from forkrl.envs.tools import Route
from forkrl.types import PolicyFeedback, Sample, ToolCall, Trajectory

MODELS = {"kb-lite", "kb-full"}
GOOD = "<think>find the founder</think><search>kb-lite: Tesk Mills founder</search><think>got it</think><answer>Ora Vin</answer>"


@pytest.mark.parametrize("text, answered, problem", [
    (GOOD, 1, None),
    ("<think>x</think><answer>A</answer>", 0, None),                       # no call at all is fine
    ("Ora Vin", 0, "no tags"),
    ("<think>x<search>kb-lite: q</search></think><answer>A</answer>", 1, "nested"),
    ("<think>x</think></search><answer>A</answer>", 0, "without its opening tag"),
    ("<think>x</think><answer>A", 0, "left open"),
    ("<think> </think><answer>A</answer>", 0, "empty"),
    ("<think>...</think><answer>A</answer>", 0, "empty"),
    ("<answer>A</answer>", 0, "no <think>"),
    ("<think>x</think><answer>A</answer><answer>B</answer>", 0, "2 <answer> blocks"),
    ("<think>x</think><search>kb-lite: q</search><answer>A</answer>", 0, "do not match"),   # the call went unanswered
    ("<think>x</think><search>kb-lite: q</search><information>made up</information><answer>A</answer>", 1,
     "do not match"),                                                        # the model wrote its own information
    ("So: <think>x</think><answer>A</answer>", 0, "start with <think>"),
    ("<think>x</think><answer>A</answer> done", 0, "end with </answer>"),
    ("<think>x</think><search>no colon here</search><answer>A</answer>", 1, "malformed route"),
    ("<think>x</think><search>gpt-9: q</search><answer>A</answer>", 1, "unknown model 'gpt-9'"),
])
def test_format_cases(text, answered, problem):
    got = format_problem(text, answered, MODELS)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got


def test_routes_parse_and_answers_score_by_em_and_f1():
    assert parse_route(" kb-full : who founded X? ") == ("kb-full", "who founded X?")
    assert parse_route("kb-full:") is None and parse_route("just a query") is None
    assert exact_match("The Kelholm.", ["kelholm"]) == 1.0 and exact_match("Kel holm", ["kelholm"]) == 0.0
    # "ora vin" against "ora vin tesk": precision 1, recall 2/3 -> F1 0.8; the best gold counts
    assert token_f1("Ora Vin", ["ora vin tesk", "bralport"]) == pytest.approx(0.8)
    assert token_f1("nothing", ["ora vin"]) == 0.0


def test_cost_percentile_transform_by_hand():
    buffer = []
    assert cost_reward(4.0, buffer) == 0.5                  # x = 2, one value: P95 = P5 -> 0.5
    # x = 4, buffer [2, 4]: P5 = 2.1, P95 = 3.9 -> (4 - 2.1) / 1.8 > 1 -> clip 1 -> 0
    assert cost_reward(16.0, buffer) == pytest.approx(0.0)
    # x = 3, buffer [2, 4, 3]: P5 = 2.1, P95 = 3.9 -> 1 - 0.9 / 1.8 = 0.5
    assert cost_reward(9.0, buffer) == pytest.approx(0.5)
    assert cost_reward(0.0, buffer) == pytest.approx(1.0)    # the cheapest so far: below P5 -> 1
    assert buffer == [2.0, 4.0, 3.0, 0.0]
    window = [2.0, 4.0]
    cost_reward(9.0, window, size=2)                          # a sliding buffer keeps the last `size`
    assert window == [4.0, 3.0]


def test_total_reward_rule():
    assert total_reward(False, True, 1.0, 1.0, 0.5) == -1.0   # the format check overrides everything
    assert total_reward(True, False, 0.0, 1.0, 0.5) == 0.0    # no answer
    assert total_reward(True, True, 0.0, 1.0, 0.5) == 0.0     # a wrong answer earns no cost credit
    assert total_reward(True, True, 1.0, 0.5, 0.25) == pytest.approx(0.875)   # 0.75 * 1 + 0.25 * 0.5
    assert total_reward(True, True, 0.8, 0.2, 0.0) == pytest.approx(0.8)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": "a", "title": "Tesk Mills", "text": "Tesk Mills was founded by Ora Vin."},
            {"id": "b", "title": "Ora Vin", "text": "Ora Vin was born in Kelholm."},
            {"id": "c", "title": "Bralport", "text": "Bralport is a port town."}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_route_tool_answers_prices_and_refuses(corpus):
    asked = []

    def generate(prompts, temperature=0.7, max_tokens=128):
        asked.append((prompts, temperature, max_tokens))
        return [" Kelholm, I think" for _ in prompts]

    tool = Route(pool=[{"name": "kb-lite", "kind": "bm25", "top_k": 1, "price": 2.0},
                       {"name": "kb-full", "kind": "bm25", "top_k": 3, "price": 10.0},
                       {"name": "smol", "kind": "lm", "price": 1.0, "temperature": 0.3, "max_tokens": 8}],
                 corpus=corpus, generate=generate)
    lite, full, lm, unknown, malformed = tool.batch(
        ["kb-lite: where was Ora Vin born", "kb-full: Ora Vin born", "smol: where was Ora Vin born", "gpt: q", "q"])
    assert lite.text.startswith("[1] Ora Vin") and "[2]" not in lite.text
    assert lite.cost == pytest.approx(len(lite.text.split()) * 2.0 / 1e6)     # words x USD per 1M
    assert "[2]" in full.text and full.cost == pytest.approx(len(full.text.split()) * 10.0 / 1e6)
    assert lm.text == "Kelholm, I think" and lm.cost == pytest.approx(3 * 1.0 / 1e6)
    assert asked[0][1:] == (0.3, 8) and "where was Ora Vin born" in asked[0][0][0]
    assert (unknown.ok, unknown.error, unknown.cost) == (False, "unknown_model", 0.0)
    assert (malformed.ok, malformed.error) == (False, "malformed_route")
    with pytest.raises(ValueError, match="price"):
        Route(pool=[{"name": "x", "kind": "bm25"}], corpus=corpus)


def _traj(text, calls, answer="Ora Vin"):
    t = Trajectory(prompt_ids=[1], tokens=[2], logprobs=[0.0], entropies=[0.0], loss_mask=[1], group="g", text=text,
                   sample=Sample(id="s", prompt="q", answer=answer))
    t.tool_calls = [ToolCall("search", (0, 1), ok=error is None, cost=cost, error=error) for cost, error in calls]
    return t


def test_router_term_sets_the_reward_and_keeps_its_buffer():
    ctx = CollectContext(step=1, prompts_per_step=1, samples_per_prompt=3, max_new_tokens=8, answer_tag="answer",
                         feedback=PolicyFeedback(), seed_of=lambda s: s, state={})
    cheap = _traj(GOOD, [(1.0, None)])
    dear = _traj(GOOD, [(16.0, None)])
    wrong = _traj(GOOD.replace("Ora Vin", "Bralport"), [(9.0, None)])
    refused = _traj(GOOD.replace("kb-lite", "gpt-9"), [(0.0, "unknown_model")])
    metrics = router_r1([cheap, dear, wrong, refused], ctx, alpha=0.5)
    assert metrics == {"router/calls/kb-lite": 0.75, "router/calls/unknown_model": 0.25}   # the share of calls per model
    # sqrt costs 1, 4, 3, 0 enter the buffer in order: cheap 0.5 (one value); dear: [1, 4] -> 0
    assert ctx.state["cost_buffer"] == [1.0, 4.0, 3.0, 0.0]
    assert cheap.reward == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert dear.reward == pytest.approx(0.5 * 1 + 0.5 * 0.0)
    assert wrong.reward == 0.0 and wrong.rewards["router_outcome"] == 0.0
    assert refused.reward == -1.0 and refused.rewards["router_format"] == -1.0
    assert dear.rewards["router_cost"] == 16.0


def test_router_term_needs_the_route_tool():
    with pytest.raises(ConfigError, match="route tool"):
        load_config("configs/router_r1.yaml", ["env.enabled=false"])


def test_held_out_evaluation_reports_what_the_calls_cost(tiny):
    """eval/tool_cost_per_traj: the greedy held-out trajectories' summed call prices, per trajectory, so
    runs with different cost coefficients compare on held-out spend too."""
    from types import SimpleNamespace

    from forkrl.metrics.evaluate import evaluate
    from forkrl.tasks.task import Task
    samples = [Sample(id=str(i), prompt=f"q{i}", answer="Ora Vin") for i in range(2)]
    task = Task("t", samples, samples, verifier=lambda s, c: float("Ora Vin" in c))

    def generate(prompts, samples, params, seed, groups=None):
        return [[_traj(GOOD, [(2e-6, None), (1e-6, None)])], [_traj(GOOD, [(4e-6, None)])]]
    res = evaluate(SimpleNamespace(tokenizer=tiny[1]), task, samples, generate=generate, tools=True)
    assert res["eval/tool_cost_per_traj"] == pytest.approx(3.5e-6)
    assert res["eval/accuracy"] == 1.0
