"""Name -> function registries for advantage estimators, policy losses and selectors.

Recipes pick methods by name; a method registers itself with a decorator next to its formula.
Unknown names fail with the list of registered ones.
"""
from __future__ import annotations

from typing import Callable


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def wrap(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = fn
            fn.registered_name = name
            return fn

        return wrap

    def get(self, name: str) -> Callable:  # type: ignore[override]
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}")
        return self[name]


ADVANTAGES = Registry("advantage estimator")
LOSSES = Registry("policy loss")
SELECTORS = Registry("sample selector")
TOKEN_SELECTORS = Registry("token selector")

register_advantage = ADVANTAGES.register
register_loss = LOSSES.register
register_selector = SELECTORS.register
register_token_selector = TOKEN_SELECTORS.register
