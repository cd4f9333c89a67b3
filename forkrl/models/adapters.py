"""Several LoRA adapters on one base model (peft's multi-adapter support): MARFT's agents are roles
served by one network with one adapter each (algorithms.md §19).

    model = add_adapters(model, ["reasoner", "actor"], lora)   # every adapter trains
    with active_adapter(model, "actor"):                       # forwards (and backwards) run the actor
        ...

peft's `set_adapter` also freezes every adapter but the active one. Here every adapter stays
trainable whichever one runs: the optimizer holds them all, and an adapter that did not run in a
step simply has no gradient.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


def adapter_names(model) -> list[str]:
    """The peft adapters of `model`, in the order they were added ([] for a plain model)."""
    return list(getattr(model, "peft_config", {}) or {})


def add_adapters(model, names: list[str], lora: dict):
    """`model` (a plain causal LM) as a peft model with one LoRA adapter per name, each from the same
    `peft.LoraConfig` keywords, all trainable; the first is active."""
    from peft import LoraConfig, get_peft_model
    config = dict(task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    for n, p in model.named_parameters():
        if any(f".{name}." in n for name in names) and "lora_" in n:
            p.requires_grad_(True)
    return model


@contextlib.contextmanager
def active_adapter(model, name: str | None) -> Iterator[None]:
    """Run the block with adapter `name` active (None: leave the model as it is). Which parameters
    train is left as it was, and the previously active adapter returns afterwards."""
    if name is None:
        yield
        return
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"the model has no LoRA adapter {name!r}; it has {names or 'none'}")
    before = model.active_adapter
    if before == name:
        yield
        return
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(before)
        for p, flag in trainable:
            p.requires_grad_(flag)


def one_adapter(requests) -> str | None:
    """The adapter every one of `requests` names (engines sample one adapter per call)."""
    names = {r.adapter for r in requests}
    if len(names) > 1:
        raise ValueError(f"one engine call samples with one adapter; these requests name {sorted(map(str, names))}")
    return names.pop() if names else None
