"""A tool environment: the protocol, the tools and the per-episode budgets.

The multi-turn loop that drives an engine through it lives in `forkrl/rollout/agent.py`; this object
only answers "what are the calls in this turn, may they run, and what do they return".
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from forkrl.envs.protocol import Call, ToolProtocol, native_tool_calls_supported
from forkrl.envs.sandbox import ToolResult
from forkrl.envs.tools import Tool, build_tools


@dataclass
class Budget:
    max_turns: int = 4             # assistant turns per episode
    max_tool_calls: int = 3        # tool calls per episode
    max_total_tokens: int = 512    # generated + observation tokens per episode
    max_observation_tokens: int = 256


@dataclass
class ToolEnv:
    protocol: ToolProtocol
    tools: dict[str, Tool]
    budget: Budget = field(default_factory=Budget)

    @classmethod
    def from_config(cls, cfg, tokenizer=None, **context) -> ToolEnv:
        """From an `EnvConfig`; `context` carries shared objects some tools take (e.g. `generate`).
        protocol "auto" uses the chat template's native <tool_call> format when it has one."""
        tools = build_tools([t if isinstance(t, dict) else {"name": t} for t in cfg.tools], **context)
        native = cfg.protocol == "native" or (cfg.protocol == "auto" and tokenizer is not None
                                              and native_tool_calls_supported(tokenizer))
        protocol = ToolProtocol(list(tools), answer_tag=cfg.answer_tag, result_tag=cfg.result_tag, native=native)
        return cls(protocol, tools, Budget(cfg.max_turns, cfg.max_tool_calls, cfg.max_total_tokens,
                                           cfg.max_observation_tokens))

    def execute(self, calls: list[Call]) -> list[ToolResult]:
        """Results in the order of `calls`; calls to the same tool run as one batch (concurrently
        where the tool can), an unknown tool gets an error observation."""
        results: list[ToolResult | None] = [None] * len(calls)
        by_tool: dict[str, list[int]] = {}
        for i, c in enumerate(calls):
            if c.tag in self.tools:
                by_tool.setdefault(c.tag, []).append(i)
            else:
                results[i] = ToolResult(f"error: unknown tool {c.tag!r}; available: {sorted(self.tools)}",
                                        ok=False, error="unknown_tool")
        for tag, idx in by_tool.items():
            start = time.perf_counter()
            try:
                out = self.tools[tag].batch([calls[i].query for i in idx])
            except Exception as e:  # a failing tool is an observation, never a crashed trainer
                out = [ToolResult(f"error: the {tag} tool failed: {type(e).__name__}: {e}", ok=False,
                                  error="tool_failed")] * len(idx)
            # a tool that does not time its calls gets an equal share of its batch's wall time (what
            # duration-aware updates and tools/seconds read)
            share = (time.perf_counter() - start) / len(idx)
            for i, r in zip(idx, out):
                results[i] = r if r.seconds else dataclasses.replace(r, seconds=share)
        return results  # type: ignore[return-value]

    def on_step(self, progress: float) -> None:
        for t in self.tools.values():
            t.on_step(progress)

    def close(self) -> None:
        for t in self.tools.values():
            t.close()
