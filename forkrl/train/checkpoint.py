"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG states, data position.

Layout: OUTPUT/checkpoints/step_000010/{weights.safetensors, optimizer.pt, state.json, rng.pt, methods.pt};
methods.pt holds the methods' state across steps (replay buffer, entropy histories), pickled.
OUTPUT/checkpoints/latest names the newest complete one (written last, so a crash mid-save leaves
the previous checkpoint in charge).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Parameters that train (all of them, or only LoRA adapters), once each even when tied."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Copy `trainable_state` output into a model of the same architecture, in place."""
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{source} does not match the model: unknown parameters {missing[:5]}")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2,
                    methods: dict | None = None, rng: dict | None = None) -> Path:
    """`rng`: the random states to record (default: the current ones; the loop passes those of the
    step's start when it saves after a failed step)."""
    root = out_dir / "checkpoints"
    path = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng or rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    torch.save(methods or {}, tmp / "methods.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    (root / "latest").write_text(path.name)
    for old in sorted(p for p in root.glob("step_*") if p != path)[:-(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    marker = out_dir / "checkpoints" / "latest"
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if path.exists() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    load_trainable_state(model, load_file(str(path / "weights.safetensors")), source=str(path))
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    state = json.loads((path / "state.json").read_text())
    methods = path / "methods.pt"
    state["methods"] = torch.load(methods, weights_only=False) if methods.exists() else {}
    return state
