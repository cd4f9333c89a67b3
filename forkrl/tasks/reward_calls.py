"""How reward functions are called: TRL's keyword convention and verl's `compute_score`.

    trl:     fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]
             (TRL's `GRPOTrainer` convention: one value per completion; `None` means "this reward does
             not apply to this sample" and leaves it out of the weighted sum; conversational prompts give
             message lists, and completions then come as [{"role": "assistant", "content": ...}])
    verl:    fn(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": float, ...}
             (verl's custom reward function, called once per completion)
    builtin: forkrl's registered rewards: the trl convention, always with text completions

The style is chosen in the reward's config (`task.rewards[].style`) or recognised from the
signature, and the signature is checked when the task is built, so a function that cannot take
what forkrl passes fails before any weights load, naming the parameter.
"""
from __future__ import annotations

import inspect
import signal
import threading
from collections.abc import Callable
from typing import Any

from forkrl.errors import RewardFunctionError

TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")
VERL_ARGUMENTS = ("data_source", "solution_str", "ground_truth", "extra_info")
STYLES = ("auto", "trl", "verl", "builtin")


class DeadlineExceeded(Exception):
    """A reward call ran past `task.reward_timeout_s`."""


_deadline = {"armed": None}   # the token of the deadline that may fire now (main thread only)
_handler_lock = threading.Lock()


def _on_deadline(signum, frame):
    token = _deadline["armed"]
    if token is not None and token["fired"]:
        _deadline["armed"] = None
        raise DeadlineExceeded(f"no result within {token['seconds']:g} s (task.reward_timeout_s)")


def call_with_deadline(fn: Callable[[], Any], seconds: float | None) -> Any:
    """fn() with a wall-clock deadline. A timer thread sends SIGUSR2 to the main thread, whose handler
    raises DeadlineExceeded there, interrupting Python loops, sleeps and blocking I/O alike (not one
    long C call that never checks for signals). It uses neither SIGALRM nor the interval timer, so a
    reward's own alarm-based timeout (math-verify's) keeps working. The handler stays installed once
    set. Off the main thread (a Ray actor), or with `seconds` None, fn() runs without a deadline."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        return fn()
    with _handler_lock:
        if signal.getsignal(signal.SIGUSR2) is not _on_deadline:
            signal.signal(signal.SIGUSR2, _on_deadline)
    token = {"fired": False, "seconds": seconds}
    main = threading.main_thread().ident

    def fire():
        if _deadline["armed"] is token:
            token["fired"] = True
            signal.pthread_kill(main, signal.SIGUSR2)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    _deadline["armed"] = token
    timer.start()
    try:
        return fn()
    finally:
        _deadline["armed"] = None
        timer.cancel()


def _parameters(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins and C functions have no signature
        return None


def reward_style(fn: Callable, declared: str = "auto") -> str:
    """The calling convention of `fn`: the declared one, else verl's when the signature names
    `solution_str` (or `data_source` and `ground_truth`), else TRL's."""
    if declared != "auto":
        return declared
    names = {p.name for p in _parameters(fn) or []}
    if "solution_str" in names or {"data_source", "ground_truth"} <= names:
        return "verl"
    return "trl"


def check_signature(name: str, fn: Callable, style: str, columns: set[str]) -> None:
    """Raise a one-line RewardFunctionError when `fn` cannot be called the way `style` calls it with
    the data's `columns`."""
    params = _parameters(fn)
    if params is None:
        return
    where = f"reward function {name!r}"
    if any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in params):
        raise RewardFunctionError(f"{where} has positional-only parameters; forkrl calls reward functions by "
                                  f"keyword ({', '.join(TRL_ARGUMENTS)} and the data columns), as TRL does")
    offered = set(VERL_ARGUMENTS) if style == "verl" else set(TRL_ARGUMENTS) | columns
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name not in offered:
            hint = ("verl's compute_score takes " + ", ".join(VERL_ARGUMENTS) if style == "verl" else
                    f"forkrl passes {', '.join(TRL_ARGUMENTS)} and the data columns {sorted(columns)}")
            raise RewardFunctionError(f"{where} needs the argument {p.name!r}, which forkrl does not pass "
                                      f"({hint})")


def accepted_keywords(fn: Callable) -> set[str] | None:
    """The keyword arguments `fn` accepts; None when it takes **kwargs (everything)."""
    params = _parameters(fn)
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def call_trl(fn: Callable, keywords: dict[str, Any]) -> list:
    accepted = accepted_keywords(fn)
    if accepted is not None:  # a function without **kwargs gets only what it names
        keywords = {k: v for k, v in keywords.items() if k in accepted}
    return list(fn(**keywords))


def call_verl(fn: Callable, data_sources: list, completions: list[str], ground_truths: list,
              extra_infos: list) -> list:
    accepted = accepted_keywords(fn)
    out = []
    for source, text, truth, extra in zip(data_sources, completions, ground_truths, extra_infos):
        keywords = {"data_source": source, "solution_str": text, "ground_truth": truth, "extra_info": extra}
        if accepted is not None:
            keywords = {k: v for k, v in keywords.items() if k in accepted}
        value = fn(**keywords)
        if isinstance(value, dict):  # verl allows {"score": ..., other metrics}
            if "score" not in value:
                raise RewardFunctionError(f"a verl reward returned a dict without 'score': {sorted(value)}")
            value = value["score"]
        out.append(value)
    return out
