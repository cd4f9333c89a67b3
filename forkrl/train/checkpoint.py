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


# -- sharded checkpoints (forkrl train --nproc N): torch.distributed.checkpoint, one folder for all ranks
def save_sharded_checkpoint(out_dir: Path, step: int, root, optimizer, scheduler, dp, keep: int = 2,
                            methods: dict | None = None, rng: dict | None = None) -> Path:
    """Every rank writes its shards of the model and optimizer (DCP, under `sharded/`) and its own
    `rank{r}.pt` (scheduler, random states, its components' state); rank 0 names it latest. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root_dir = out_dir / "checkpoints"
    path, tmp = root_dir / f"step_{step:06d}", root_dir / f".tmp_step_{step:06d}"
    if dp.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dp.barrier()
    model_sd, optim_sd = get_state_dict(root, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "sharded"))
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng or rng_state(), "methods": methods or {}},
               tmp / f"rank{dp.rank}.pt")
    dp.barrier()
    if dp.is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": dp.world}, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        (root_dir / "latest").write_text(path.name)
        for old in sorted(p for p in root_dir.glob("step_*") if p != path)[:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    dp.barrier()
    return path


def load_sharded_checkpoint(path: Path, root, optimizer, scheduler, dp) -> dict:
    """The inverse of save_sharded_checkpoint, at the same world size. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from forkrl.errors import UserError
    state = json.loads((path / "state.json").read_text())
    if state.get("world_size", 1) != dp.world:
        raise UserError(f"{path} was written by {state.get('world_size', 1)} rank(s); resume it with "
                        f"--nproc {state.get('world_size', 1)} (this run has {dp.world})")
    model_sd, optim_sd = get_state_dict(root, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "sharded"))
    set_state_dict(root, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    mine = torch.load(path / f"rank{dp.rank}.pt", weights_only=False)
    scheduler.load_state_dict(mine["scheduler"])
    torch.set_rng_state(mine["rng"]["torch"])
    random.setstate(mine["rng"]["python"])
    np.random.set_state(mine["rng"]["numpy"])
    state["methods"] = mine["methods"]
    return state
