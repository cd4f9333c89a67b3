"""Tools an agent calls from inside its reasoning, each registered by name.

A tool is a small class with a `name`, the tag the model writes (`<python>...</python>` by default:
the tag is the name), and `__call__(query) -> ToolResult`; `batch(queries)` runs many (the python
tool runs them concurrently in its sandbox pool). Add one with

    @register_tool("weather")
    class Weather(Tool):
        def __call__(self, query: str) -> ToolResult:
            return ToolResult(f"sunny in {query.strip()}")

and list it in `env.tools`. Tools never run model-written code in this process: `python` goes to the
sandbox, `calculator` walks a syntax tree, `search` ranks a local corpus with BM25 (bm25s).
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from pathlib import Path

from forkrl.arithmetic import eval_arithmetic
from forkrl.envs.sandbox import (
    ISOLATIONS,
    PythonSandbox,
    SandboxLimits,
    ToolResult,
    limit_names,
    truncate,
)
from forkrl.registry import TOOLS
from forkrl.registry import register_tool as _register


def register_tool(name: str):
    """Register a Tool class under `name` (also its default tag)."""
    def wrap(cls):
        cls.name = name
        return _register(name)(cls)
    return wrap


class Tool:
    name = "tool"

    def __init__(self, tag: str | None = None, **_):
        self.tag = tag or self.name

    @classmethod
    def option_names(cls) -> set[str]:
        """The options a config entry may give this tool: its constructor's named parameters."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Raise ValueError naming any option this tool does not know (run by the config schema)."""
        unknown = sorted(set(options) - cls.option_names())
        if unknown:
            raise ValueError(f"tool {cls.name!r} has no option {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(cls.option_names()))}")

    def __call__(self, query: str) -> ToolResult:
        raise NotImplementedError

    def batch(self, queries: list[str]) -> list[ToolResult]:
        return [self(q) for q in queries]

    def on_step(self, progress: float) -> None:
        """Called before every training step with progress in [0, 1] (for curricula)."""

    def close(self) -> None:
        pass


@register_tool("python")
class PythonTool(Tool):
    """Model-written code in the sandbox (`forkrl/envs/sandbox.py`); stdout, stderr and the exception
    come back as the observation. Like a notebook cell, a bare final expression is printed."""

    def __init__(self, tag: str | None = None, isolation: str = "auto", **limits):
        super().__init__(tag)
        self.sandbox = PythonSandbox(SandboxLimits(**limits), isolation=isolation)

    @classmethod
    def option_names(cls) -> set[str]:
        return super().option_names() | set(limit_names())

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        if options.get("isolation", "auto") not in ISOLATIONS:
            raise ValueError(f"tool 'python' option isolation must be one of {', '.join(ISOLATIONS)}; "
                             f"got {options['isolation']!r}")
        SandboxLimits(**{k: v for k, v in options.items() if k in limit_names()})

    @staticmethod
    def _print_last_expression(code: str) -> str:
        import ast
        try:
            tree = ast.parse(code)
        except SyntaxError:
            return code  # let the sandbox report it
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body[-1]
            if not (isinstance(last.value, ast.Call) and getattr(last.value.func, "id", "") == "print"):
                lines = code.splitlines()
                start, end = last.lineno - 1, last.end_lineno
                expr = "\n".join(lines[start:end])
                return "\n".join(lines[:start] + [f"print({expr.strip()})"] + lines[end:])
        return code

    def __call__(self, query: str) -> ToolResult:
        return self.batch([query])[0]

    def batch(self, queries: list[str]) -> list[ToolResult]:
        return self.sandbox.run_many([self._print_last_expression(q) for q in queries])

    def close(self) -> None:
        self.sandbox.close()


@register_tool("calculator")
class Calculator(Tool):
    """Bounded arithmetic (+ - * / // % ** and parentheses) without `eval`."""

    def __call__(self, query: str) -> ToolResult:
        value = eval_arithmetic(query, allow_pow=True)
        if value is None:
            return ToolResult("error: not an arithmetic expression I can evaluate", ok=False, error="invalid")
        return ToolResult(str(int(value)) if value == int(value) else f"{value:.10g}")


def load_corpus(path: str | Path) -> list[dict]:
    """A .jsonl or .parquet corpus, one {"id", "title"?, "text"} per row; errors name the file and line."""
    from forkrl.io import read_rows
    docs = []
    for lineno, row in read_rows(path):
        if "text" not in row:
            raise ValueError(f"{path}:{lineno}: a corpus row needs a 'text' field")
        docs.append(row)
    return docs


def _passage(doc: dict) -> str:
    return f"{doc['title']}: {doc['text']}" if doc.get("title") else doc["text"]


@register_tool("search")
class LocalSearch(Tool):
    """BM25 (bm25s) over a local corpus; the observation lists the top-k passages."""

    def __init__(self, tag: str | None = None, corpus: str | None = None, top_k: int = 3,
                 max_chars: int = 1200, **_):
        super().__init__(tag)
        if corpus is None:
            raise ValueError("the search tool needs `corpus`, a .jsonl file of {id, title, text} rows")
        try:
            import bm25s
        except ImportError:
            raise ImportError("the search tool needs bm25s: pip install bm25s") from None
        self.docs = load_corpus(corpus)
        self.top_k, self.max_chars = top_k, max_chars
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([_passage(d) for d in self.docs], stopwords="en", show_progress=False),
                             show_progress=False)
        self._tokenize = bm25s.tokenize

    def __call__(self, query: str) -> ToolResult:
        if not query.strip():
            return ToolResult("error: empty query", ok=False, error="invalid")
        tokens = self._tokenize([query], stopwords="en", show_progress=False)
        if not tokens.ids or not tokens.ids[0]:
            return ToolResult("no results", ok=True)
        k = min(self.top_k, len(self.docs))
        idx, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        hits = [self.docs[int(i)] for i, s in zip(idx[0], scores[0]) if s > 0]
        if not hits:
            return ToolResult("no results", ok=True)
        text = "\n".join(f"[{j + 1}] {_passage(d)}" for j, d in enumerate(hits))
        return ToolResult(truncate(text, self.max_chars))


SIMULATED_SEARCH_PROMPT = (
    "You are a search engine. Write {n} short documents (one line each, numbered) that answer the query."
    "{noise}\nQuery: {query}\nDocuments:\n")
NOISY_INSTRUCTION = " Make them plausible but wrong: they must not contain the correct answer."


@register_tool("simulated_search")
class SimulatedSearch(Tool):
    """ZeroSearch's simulated engine (algorithms.md §21): a language model writes the documents for a
    query. With probability `noise` a query gets deliberately misleading documents instead of useful
    ones. ZeroSearch's curriculum raises it over training: with `noise_end` set, the share moves
    linearly from `noise` to `noise_end`. `generate(prompts) -> texts` is any text generator (the
    trainer passes one built on a frozen model)."""

    def __init__(self, tag: str | None = None, generate: Callable[[list[str]], list[str]] | None = None,
                 noise: float = 0.0, noise_end: float | None = None, n_docs: int = 3, seed: int = 0,
                 max_chars: int = 1200, **_):
        super().__init__(tag or "search")
        if generate is None:
            raise ValueError("simulated_search needs a `generate(prompts) -> texts` function")
        if not 0 <= noise <= 1:
            raise ValueError(f"simulated_search noise must be in [0, 1], got {noise}")
        self.generate, self.noise, self.n_docs, self.max_chars = generate, noise, n_docs, max_chars
        self.noise_start, self.noise_end = noise, noise_end
        self.rng = random.Random(seed)
        self.noisy_calls = 0

    def on_step(self, progress: float) -> None:
        if self.noise_end is not None:
            self.noise = self.noise_start + (self.noise_end - self.noise_start) * min(max(progress, 0.0), 1.0)

    def batch(self, queries: list[str]) -> list[ToolResult]:
        noisy = [self.rng.random() < self.noise for _ in queries]
        self.noisy_calls += sum(noisy)
        prompts = [SIMULATED_SEARCH_PROMPT.format(n=self.n_docs, query=q.strip(), noise=NOISY_INSTRUCTION if bad else "")
                   for q, bad in zip(queries, noisy)]
        return [ToolResult(truncate(t.strip(), self.max_chars)) for t in self.generate(prompts)]

    def __call__(self, query: str) -> ToolResult:
        return self.batch([query])[0]


ROUTE_ANSWER_PROMPT = "Answer the question in a few words.\nQuestion: {query}\nAnswer:"


@register_tool("route")
class Route(Tool):
    """Router-R1's routing environment (algorithms.md §20): `<search>model-name: query</search>` sends the
    sub-question to one responder of `pool`, and the reply comes back as the observation. Each call
    costs completion tokens x `price` (USD per 1M tokens) of the responder that answered
    (`ToolResult.cost`). A pool entry is {name, price, kind, ...}:

      kind: bm25  the top_k (1) passages of `corpus` by BM25 (a retrieval "model" that knows the corpus)
      kind: lm    a frozen copy of the policy's base model answering at `temperature` (0.7), at most
                  `max_tokens` (48) tokens (the trainer passes `generate`)

    An unknown name or a malformed `name: query` is refused (error unknown_model / malformed_route),
    costs nothing, and fails Router-R1's format check. Completion tokens are counted with the
    policy's tokenizer (`count_tokens`, passed by the trainer; whitespace words without one)."""

    def __init__(self, tag: str | None = None, pool: list[dict] | None = None, corpus: str | None = None,
                 generate: Callable[..., list[str]] | None = None, count_tokens: Callable[[str], int] | None = None,
                 max_chars: int = 800, **_):
        super().__init__(tag or "search")
        if not pool:
            raise ValueError("the route tool needs `pool`, a list of {name, price, kind: bm25|lm, ...}")
        self.responders: dict[str, dict] = {}
        self.searchers: dict[int, LocalSearch] = {}
        for entry in pool:
            entry = dict(entry)
            name, kind = entry.get("name"), entry.get("kind", "bm25")
            if not name or "price" not in entry:
                raise ValueError(f"route pool entry {entry} needs a name and a price (USD per 1M tokens)")
            if kind == "bm25":
                if corpus is None:
                    raise ValueError(f"route responder {name!r} (bm25) needs the tool's `corpus`")
                k = int(entry.get("top_k", 1))
                if k not in self.searchers:
                    self.searchers[k] = LocalSearch(corpus=corpus, top_k=k, max_chars=max_chars)
            elif kind == "lm":
                if generate is None:
                    raise ValueError(f"route responder {name!r} (lm) needs a text generator")
            else:
                raise ValueError(f"route responder {name!r}: kind must be bm25 or lm, got {kind!r}")
            self.responders[name] = {"kind": kind, "price": float(entry["price"]), "top_k": int(entry.get("top_k", 1)),
                                     "temperature": float(entry.get("temperature", 0.7)),
                                     "max_tokens": int(entry.get("max_tokens", 48))}
        self.generate, self.max_chars = generate, max_chars
        self.count_tokens = count_tokens or (lambda text: len(text.split()))

    def batch(self, queries: list[str]) -> list[ToolResult]:
        from forkrl.envs.router import parse_route
        out: list[ToolResult | None] = [None] * len(queries)
        lm_calls: dict[tuple[float, int], list[tuple[int, str, dict]]] = {}
        for i, q in enumerate(queries):
            route = parse_route(q)
            if route is None:
                out[i] = ToolResult("error: write <search>model-name: query</search>", ok=False, error="malformed_route")
                continue
            name, query = route
            r = self.responders.get(name)
            if r is None:
                out[i] = ToolResult(f"error: unknown model {name!r}; available: {', '.join(self.responders)}",
                                    ok=False, error="unknown_model")
            elif r["kind"] == "bm25":
                reply = self.searchers[r["top_k"]](query)
                out[i] = ToolResult(reply.text, ok=reply.ok, error=reply.error,
                                    cost=self.count_tokens(reply.text) * r["price"] / 1e6)
            else:  # one generator call per sampling setting
                lm_calls.setdefault((r["temperature"], r["max_tokens"]), []).append((i, query, r))
        for (temperature, max_tokens), calls in lm_calls.items():
            texts = self.generate([ROUTE_ANSWER_PROMPT.format(query=q) for _, q, _ in calls],
                                  temperature=temperature, max_tokens=max_tokens)
            for (i, _, r), text in zip(calls, texts):
                text = text.strip()
                out[i] = ToolResult(truncate(text, self.max_chars), cost=self.count_tokens(text) * r["price"] / 1e6)
        return out

    def __call__(self, query: str) -> ToolResult:
        return self.batch([query])[0]


def build_tools(specs: list[dict], **context) -> dict[str, Tool]:
    """Tools from config entries {name, tag?, ...options}; `context` supplies shared objects (e.g.
    `generate` for simulated_search) to the tools that take them. Keyed by the tag the model writes."""
    tools: dict[str, Tool] = {}
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        if name not in TOOLS:
            raise ValueError(f"unknown tool {name!r}; registered: {sorted(TOOLS)}")
        accepted = inspect.signature(TOOLS[name].__init__).parameters
        shared = {k: v for k, v in context.items() if k in accepted}
        tool = TOOLS[name](**{**shared, **spec})
        if tool.tag in tools:
            raise ValueError(f"two tools use the tag <{tool.tag}>")
        tools[tool.tag] = tool
    return tools
