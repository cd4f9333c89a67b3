"""Tool protocol parsing, the multi-turn loop's masks and limits, token-in/token-out, and tools."""
import json
import math

import pytest

from forkrl.envs import Budget, ToolEnv, ToolProtocol, ToolResult
from forkrl.envs.tools import (
    Calculator,
    LocalSearch,
    PythonTool,
    SimulatedSearch,
    Tool,
    build_tools,
)
from forkrl.rollout.agent import multi_turn_rollout
from forkrl.types import Completion, SamplingParams

# -- parsing ------------------------------------------------------------------------------------

def test_parse_one_call_and_stop_strings():
    p = ToolProtocol(["python", "search"])
    calls = p.parse_calls("Let me compute.\n<python>\nprint(2+3)\n</python>")
    assert [(c.tag, c.query) for c in calls] == [("python", "print(2+3)")]
    assert p.stop_strings() == ["</python>", "</search>", "</answer>"]


def test_parse_multiple_calls_in_one_turn_in_order():
    p = ToolProtocol(["python", "search"])
    calls = p.parse_calls("<search>Kaldor Mills</search> then <python>1+1</python> and <search>Quenford</search>")
    assert [(c.tag, c.query) for c in calls] == [("search", "Kaldor Mills"), ("python", "1+1"), ("search", "Quenford")]


def test_parse_nested_tags_are_part_of_the_body():
    p = ToolProtocol(["python", "search"])
    calls = p.parse_calls('<python>s = "<search>x</search>"\nprint(s)</python>')
    assert len(calls) == 1 and calls[0].tag == "python" and calls[0].query == 's = "<search>x</search>"\nprint(s)'


def test_parse_unterminated_block_is_text_and_later_calls_count():
    p = ToolProtocol(["python", "search"])
    assert p.parse_calls("<python>print(1)") == []
    calls = p.parse_calls("<search>never closed <python>2*3</python>")
    assert [(c.tag, c.query) for c in calls] == [("python", "2*3")]


def test_parse_native_tool_call_json():
    p = ToolProtocol(["python"], native=True)
    calls = p.parse_calls('<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>'
                          '<tool_call>not json</tool_call>')
    assert (calls[0].tag, calls[0].query) == ("python", "print(1)")
    assert calls[1].tag == "__invalid__"
    assert p.stop_strings()[0] == "</tool_call>"
    assert "<tool_response>" in p.format_observation(["1"])


# -- the multi-turn loop on a scripted engine -----------------------------------------------------

class CharTokenizer:
    """One token per character (ids = code points), so text and tokens map exactly."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Replies with the next scripted turn for each request; records what it was asked to continue."""
    def __init__(self, turns, finish_last="eos"):
        self.turns, self.finish_last, self.seen = turns, finish_last, []

    def generate(self, requests, seed=None):
        out = []
        for r in requests:
            self.seen.append(list(r.prompt_ids))
            text = self.turns[min(self._turn(r), len(self.turns) - 1)]
            text = text[:r.params.max_tokens]
            ids = [ord(c) for c in text]
            finish = "stop" if any(text.endswith(s) for s in r.params.stop) else (
                "length" if len(text) >= r.params.max_tokens else self.finish_last)
            out.append([Completion(ids, [-0.5] * len(ids), [1.0] * len(ids), finish, text)])
        return out

    def _turn(self, request):
        return sum(1 for c in map(chr, request.prompt_ids) if c == "\x01")  # observations end with \x01


class EchoTool(Tool):
    name = "echo"

    def __call__(self, query):
        return ToolResult(f"echo:{query}\x01", ok=query != "bad")


def _env(max_turns=4, max_tool_calls=3, max_total_tokens=500, tags=("echo",)):
    return ToolEnv(ToolProtocol(list(tags)), {t: EchoTool(t) for t in tags},
                   Budget(max_turns, max_tool_calls, max_total_tokens, 100))


def _run(engine, env, n=1):
    prompt = [ord(c) for c in "Q?"]
    return multi_turn_rollout(engine, env, CharTokenizer(), [prompt], ["g"], [None],
                              SamplingParams(max_tokens=200, n=n), seed=0)


def test_observations_are_masked_and_trained_tokens_are_the_sampled_ones():
    turns = ["think <echo>hi</echo>", " more <echo>bad</echo>", " <answer>7</answer>"]
    engine = ScriptedEngine(turns)
    (t,) = _run(engine, _env())
    sampled = [ord(c) for c in "".join(turns)]
    assert [tok for tok, m in zip(t.tokens, t.loss_mask) if m] == sampled   # token in, token out
    obs = "".join(chr(tok) for tok, m in zip(t.tokens, t.loss_mask) if not m)
    assert obs == "\n<result>\necho:hi\x01\n</result>\n\n<result>\necho:bad\x01\n</result>\n"
    # every turn continued from the exact ids of the prompt + all earlier tokens
    assert engine.seen[1] == [ord("Q"), ord("?")] + t.tokens[:engine.seen[1].__len__() - 2]
    assert engine.seen[2] == [ord("Q"), ord("?")] + t.tokens[:len(engine.seen[2]) - 2]
    assert t.finish == "answer" and t.turns == 3 and t.text == "".join(turns)
    assert [(c.name, c.ok) for c in t.tool_calls] == [("echo", True), ("echo", False)]
    assert all(math.isnan(e) for e, m in zip(t.entropies, t.loss_mask) if not m)
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if not m)
    s, e = t.tool_calls[0].span
    assert "".join(chr(x) for x in t.tokens[s:e]).startswith("\n<result>")


def test_tool_call_budget_ends_the_episode():
    engine = ScriptedEngine(["<echo>a</echo>", "<echo>b</echo>", "<echo>c</echo>"])
    (t,) = _run(engine, _env(max_tool_calls=1))
    assert t.finish == "tool_budget" and len(t.tool_calls) == 1 and t.turns == 2


def test_turn_limit_ends_the_episode():
    engine = ScriptedEngine(["<echo>a</echo>"] * 5)
    (t,) = _run(engine, _env(max_turns=2))
    assert t.finish == "turns" and t.turns == 2 and len(t.tool_calls) == 1


def test_token_budget_counts_observations():
    engine = ScriptedEngine(["<echo>aaaaaaaaaa</echo>", "x" * 100])
    (t,) = _run(engine, _env(max_total_tokens=40))
    assert len(t.tokens) <= 40 and t.finish == "length"


def test_eos_without_a_call_ends_after_one_turn_and_n_samples_are_separate():
    engine = ScriptedEngine(["just 7"])
    trajs = _run(engine, _env(), n=3)
    assert len(trajs) == 3 and all(t.finish == "eos" and t.turns == 1 and not t.tool_calls for t in trajs)


# -- tools --------------------------------------------------------------------------------------

def test_calculator():
    c = Calculator()
    assert c("(12 + 30) * 2").text == "84" and c("2 ** 10").text == "1024" and c("7 / 2").text == "3.5"
    assert not c("__import__('os')").ok


def test_search_ranks_the_passage_that_answers(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in [
        {"id": "1", "title": "Kaldor Mills", "text": "Kaldor Mills was founded by Ina Vell."},
        {"id": "2", "title": "Ina Vell", "text": "Ina Vell was born in Quenford."},
        {"id": "3", "title": "Tesk", "text": "Tesk is a city."}]))
    s = LocalSearch(corpus=str(corpus), top_k=1)
    assert "Quenford" in s("Where was Ina Vell born?").text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        LocalSearch(corpus=str(bad))


def test_simulated_search_noise_share():
    seen = []
    s = SimulatedSearch(generate=lambda ps: (seen.extend(ps), ["1. doc"] * len(ps))[1], noise=1.0)
    assert s("capital of Tesk").text == "1. doc"
    assert "not contain the correct answer" in seen[0]
    s0 = SimulatedSearch(generate=lambda ps: ["x"] * len(ps), noise=0.0, noise_end=0.5)
    s0.batch(["a"] * 20)
    assert s0.noisy_calls == 0
    s0.on_step(0.5)      # the curriculum: 0 -> 0.5 over training
    assert s0.noise == pytest.approx(0.25)


def test_python_tool_prints_the_last_expression_and_runs_in_a_pool():
    tool = PythonTool(timeout_s=10)
    out = tool.batch(["x = 6\nx * 7", "print('hi')", "1/0"])
    assert out[0].text == "42" and out[1].text == "hi"
    assert not out[2].ok and "ZeroDivisionError" in out[2].text
    tool.close()


def test_build_tools_rejects_unknown_and_duplicate_tags():
    with pytest.raises(ValueError, match="unknown tool"):
        build_tools([{"name": "nope"}])
    with pytest.raises(ValueError, match="two tools"):
        build_tools([{"name": "calculator"}, {"name": "calculator"}])


# -- GRPO-RoC (§13.6) ----------------------------------------------------------------------------

def test_resample_on_correct_keeps_the_cleanest_successes_by_hand():
    import torch

    from forkrl.algos.selection import resample_on_correct
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0.])
    penalty = torch.tensor([0.3, 0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.0])
    idx = resample_on_correct(correct, penalty, 4, generator=torch.Generator().manual_seed(0)).tolist()
    assert [i for i in idx if i < 4] == [1, 3] and len([i for i in idx if i >= 4]) == 2  # 4 * 4/8 = 2 each
    # one success in 8: round(0.5) = 0, raised to min(2, 1) = 1; three failures
    idx = resample_on_correct(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0.]), torch.zeros(8), 4).tolist()
    assert 0 in idx and len(idx) == 4
    # seven successes, one failure: the failure stays (min 2, only 1 exists), three successes
    idx = resample_on_correct(torch.tensor([1, 1, 1, 1, 1, 1, 1, 0.]), torch.arange(8.), 4).tolist()
    assert idx == [0, 1, 2, 7]


def test_roc_penalty_by_hand():
    from forkrl.rollout.agent import roc_penalty
    from forkrl.types import ToolCall, Trajectory
    t = Trajectory([1], [2], [0.0], [1.0], [1], "g", text="<answer>1</answer> <answer>2</answer>", turns=2,
                   tool_calls=[ToolCall("python", (0, 1), ok=False), ToolCall("python", (1, 2), ok=True)])
    assert roc_penalty(t) == pytest.approx(0.5 + 0.5)      # 1 of 2 calls failed; (2 - 1) / 2 turns
    t.tool_calls, t.text = [], "no tags"
    assert roc_penalty(t) == pytest.approx(0.5 + 1.0)      # no call: 0.5; no answer tags: 1


def test_readme_tool_example_registers_and_answers():
    import re

    from forkrl.envs import TOOLS
    text = open("README.md").read()
    block = re.search(r"\*\*Your own tool\*\*.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    exec(compile(block, "README.md", "exec"), {})
    try:
        tools = build_tools([{"name": "weather"}])
        assert tools["weather"]("Oslo ").text == "sunny in Oslo"
    finally:
        del TOOLS["weather"]


def test_auto_protocol_follows_the_chat_template():
    from types import SimpleNamespace

    from forkrl.config import EnvConfig
    cfg = EnvConfig(enabled=True, tools=["calculator"], protocol="auto")
    hermes = SimpleNamespace(chat_template="{% if tools %}<tool_call>{{ t }}</tool_call>{% endif %}")
    plain = SimpleNamespace(chat_template="{{ messages }}")
    assert ToolEnv.from_config(cfg, tokenizer=hermes).protocol.native
    assert not ToolEnv.from_config(cfg, tokenizer=plain).protocol.native
