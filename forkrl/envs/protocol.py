"""How a model calls tools in text, and how results come back.

Tag protocol (default): `<python>code</python>`, `<search>query</search>`, one tag per tool. The engine
stops at a closing tag; the environment runs the call and appends `<result>...</result>`.
Native protocol: the chat template's own `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
JSON blocks (Hermes/Qwen style), answered with `<tool_response>...</tool_response>`.

Parsing rules (tested): calls are read left to right; a call's body runs to the first closing tag
of the same name, so tags written inside it are part of the body; an opening tag without its
closing tag is text, and calls after or inside it still count; several calls in one turn are all
returned, in order.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class Call:
    tag: str        # which tool (its tag)
    query: str      # the body the model wrote
    start: int      # character span of the whole block in the turn's text
    end: int


class ToolProtocol:
    def __init__(self, tags: list[str], *, answer_tag: str | None = "answer", result_tag: str = "result",
                 native: bool = False):
        self.tags = list(tags)
        self.answer_tag = answer_tag
        self.result_tag = "tool_response" if native else result_tag
        self.native = native
        names = "|".join(re.escape(t) for t in (["tool_call"] if native else self.tags))
        self._open = re.compile(rf"<({names})>") if names else None

    def stop_strings(self) -> list[str]:
        closers = ["</tool_call>"] if self.native else [f"</{t}>" for t in self.tags]
        return closers + ([f"</{self.answer_tag}>"] if self.answer_tag else [])

    def parse_calls(self, text: str) -> list[Call]:
        calls: list[Call] = []
        pos = 0
        while self._open is not None:
            m = self._open.search(text, pos)
            if m is None:
                break
            tag = m.group(1)
            close = text.find(f"</{tag}>", m.end())
            if close < 0:               # unterminated: text, keep scanning inside it
                pos = m.end()
                continue
            end = close + len(tag) + 3
            body = text[m.end():close]
            if self.native:
                call = self._native_call(body, m.start(), end)
                if call is not None:
                    calls.append(call)
            else:
                calls.append(Call(tag, body.strip("\n"), m.start(), end))
            pos = end
        return calls

    def _native_call(self, body: str, start: int, end: int) -> Call | None:
        try:
            obj = json.loads(body)
            name = obj["name"]
            args = obj.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            return Call("__invalid__", body, start, end)
        if isinstance(args, dict):
            query = next(iter(args.values()), "") if len(args) == 1 else json.dumps(args)
        else:
            query = str(args)
        return Call(name, str(query), start, end)

    def has_answer(self, text: str) -> bool:
        return bool(self.answer_tag) and f"</{self.answer_tag}>" in text and f"<{self.answer_tag}>" in text

    def format_observation(self, results: list[str]) -> str:
        return "".join(f"\n<{self.result_tag}>\n{r}\n</{self.result_tag}>\n" for r in results)


def native_tool_calls_supported(tokenizer) -> bool:
    """Whether the tokenizer's chat template speaks the <tool_call> JSON format."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "<tool_call>" in template
