"""Agent environments: the tool-call protocol, tools (sandboxed Python, calculator, local and simulated
search) and per-episode budgets. The multi-turn loop that uses them is `forkrl.rollout.agent`."""
from forkrl.envs.env import Budget, ToolEnv
from forkrl.envs.protocol import Call, ToolProtocol
from forkrl.envs.sandbox import PythonSandbox, SandboxLimits, ToolResult
from forkrl.envs.tools import TOOLS, Tool, build_tools, register_tool

__all__ = ["TOOLS", "Budget", "Call", "PythonSandbox", "SandboxLimits", "Tool", "ToolEnv", "ToolProtocol",
           "ToolResult", "build_tools", "register_tool"]
