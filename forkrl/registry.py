"""The one registry: every kind of method is a name a recipe can pick.

    from forkrl.registry import register_gate

    @register_gate("my_gate")
    def my_gate(groups, refill, ctx, *, threshold: float = 0.5):
        ...

Each kind (losses, advantages, selectors, samplers, tools, rewards, reward terms, gates, engines,
task sources) is a `Registry`. Hooks that belong to a method are given in its decorator
(`@register_loss("clip_cov", prepare=...)`) and read back with `hook(name, "prepare")`.

A registry knows which of forkrl's modules fill it (`builtins`) and imports them the first time
someone looks a name up, so the config can check names without importing the stages that own the
methods (the dependency rules of docs/architecture.md); a user's own module, listed in a recipe's
`plugins`, is imported before validation and registers the same way. This module imports nothing
from forkrl.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any

# what the learner can pass a learner method (advantage, loss, selector); never a recipe's hyperparameter
LEARNER_ARGUMENTS = frozenset({
    "entropy",    # [B, T] token entropy: sampling-time for advantages/selectors, current policy for losses
    "agg", "norm",  # loss aggregation mode and its mini-batch normalisers
    "weight",     # [B, T] per-token loss weight (rollout correction), applied before aggregation
    "stats",      # what the loss's `prepare` computed over the whole rollout batch
    "adv",        # [B, T] advantages (token selectors)
    "progress",   # training progress in [0, 1] (schedules)
    "turn",       # [B, T] 1-based index of the assistant turn a generated token belongs to, 0 elsewhere
    "origin",     # [B, T] key of the sampled token at each position, shared by branches of one prefix; -1 padding
    "sampling_logp",  # [B, T] the sampler's log-prob of each generated token (advantages)
    "values",     # [B, T] the critic's values of the states before each generated token (algo.critic)
    "returns",    # [B, T] the critic's targets: lambda-returns by GAE (algo.critic.gamma, lam)
    "steps",      # [B, 3] step-level samples of episodes: episode id, step index, matched (UI-S1)
    "value_mask", # [B, T] where the critic reads and trains (every generated token, or each row's first)
    "words",      # [B] words of each row's generated text (MARFT's action log-prob by words)
    "adapter",    # [B] index of each row's LoRA adapter (model.adapters), None without adapters
    "step",       # the training step (1-based)
})


def hyperparameters(fn: Callable, reserved: frozenset[str] = frozenset()) -> list[str]:
    """The keyword-only parameters of `fn` a recipe may set (those not `reserved` for the stage)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name not in reserved]


class Registry:
    """Name -> method, for one kind; hooks per name; the shipped methods imported on first lookup.
    `reserved`: keyword arguments the calling stage fills itself (not a recipe's hyperparameters)."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = (), reserved: frozenset[str] = frozenset()):
        self.kind = kind
        self.builtins = builtins
        self.reserved = reserved
        self._methods: dict[str, Any] = {}
        self._hooks: dict[str, dict[str, Any]] = {}
        self._loaded = not builtins

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a builtin module that looks a name up while importing must not recurse
            for module in self.builtins:
                importlib.import_module(module)

    def register(self, name: str, **hooks) -> Callable:
        """Decorator: `@REGISTRY.register("name", hook=value, ...)`; a name may be registered once."""
        def wrap(method):
            if name in self._methods:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._methods[name] = method
            self._hooks[name] = dict(hooks)
            method.registered_name = name
            return method
        return wrap

    def get(self, name: str):
        self._load()
        if name not in self._methods:
            close = difflib.get_close_matches(name, list(self._methods), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; registered: {sorted(self._methods)}")
        return self._methods[name]

    def hook(self, name: str, hook: str, default: Any = None) -> Any:
        self.get(name)
        return self._hooks[name].get(hook, default)

    def hyperparameters(self, name: str) -> list[str]:
        """What a recipe may set for method `name`: its keyword-only parameters, less the reserved ones."""
        return hyperparameters(self.get(name), self.reserved)

    def choices(self, name: str) -> dict[str, tuple]:
        """The allowed values of method `name`'s hyperparameters that are annotated `Literal[...]`."""
        fn = self.get(name)
        try:
            hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
        except (NameError, TypeError):  # an annotation that does not resolve: nothing to check by
            return {}
        return {k: typing.get_args(hints[k]) for k in self.hyperparameters(name)
                if k in hints and typing.get_origin(hints[k]) is typing.Literal}

    def names(self) -> list[str]:
        self._load()
        return sorted(self._methods)

    def unregister(self, name: str) -> None:
        """Remove a method (tests register throw-away ones)."""
        self._methods.pop(name, None)
        self._hooks.pop(name, None)

    def __getitem__(self, name: str):
        return self.get(name)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


_ALGOS = ("forkrl.algos",)
ADVANTAGES = Registry("advantage estimator", _ALGOS, LEARNER_ARGUMENTS)
LOSSES = Registry("policy loss", _ALGOS, LEARNER_ARGUMENTS)
SELECTORS = Registry("sample selector", _ALGOS, LEARNER_ARGUMENTS)
TOKEN_SELECTORS = Registry("token selector", _ALGOS, LEARNER_ARGUMENTS)
SAMPLERS = Registry("sampler", ("forkrl.rollout", "forkrl.agents.program"))
ENGINES = Registry("engine", ("forkrl.rollout",))
TOOLS = Registry("tool", ("forkrl.envs.tools",))
REWARDS = Registry("reward", ("forkrl.tasks.task", "forkrl.tasks.semi_online"))
TASK_SOURCES = Registry("task source", ("forkrl.tasks.task", "forkrl.collect.programs"))
REWARD_TERMS = Registry("reward term", ("forkrl.collect.reward_terms", "forkrl.collect.programs"))
GATES = Registry("group gate", ("forkrl.collect.gates",))

register_advantage = ADVANTAGES.register
register_loss = LOSSES.register
register_selector = SELECTORS.register
register_token_selector = TOKEN_SELECTORS.register
register_sampler = SAMPLERS.register
register_engine = ENGINES.register
register_tool = TOOLS.register
register_reward = REWARDS.register
register_task_source = TASK_SOURCES.register
register_reward_term = REWARD_TERMS.register
register_gate = GATES.register


def import_plugins(modules: list[str]) -> None:
    """Import a recipe's `plugins` (modules that register methods); a failure names the module.
    Modules next to the user's config import as with `python -m` (the working directory is on the path)."""
    import sys
    from pathlib import Path
    if modules and str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure of a user's module is reported the same way
            raise ImportError(f"plugins: cannot import {module!r}: {type(e).__name__}: {e}") from None
