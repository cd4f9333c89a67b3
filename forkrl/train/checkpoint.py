"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG states, data position.

Layout: OUTPUT/checkpoints/step_000010/{weights.safetensors, optimizer.pt, state.json, rng.pt, methods.pt,
manifest.json}; methods.pt holds the methods' state across steps (replay buffer, entropy histories),
pickled; state.json the step and the run's config; manifest.json every file's size, written last.

A checkpoint is written into a hidden folder, synced, renamed into place, and only then named by
OUTPUT/checkpoints/latest (itself replaced atomically); older ones are pruned after that, so a
complete checkpoint exists at every moment. `checkpoint_problem` checks one against its manifest,
and `Loop.resume` falls back to the newest intact one, saying which is broken; a full disk is reported as such and
leaves no partial checkpoint behind.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from forkrl.errors import RunDirError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """The random states `rng_state` saved (CUDA's where this process has the same GPUs)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2,
                    methods: dict | None = None, rng: dict | None = None) -> Path:
    """`state`: what state.json records beside the step (the loop's config). `rng`: the random states
    to record (default: the current ones; the loop passes those of the step's start when it saves
    after a failed step)."""
    root = out_dir / "checkpoints"
    path, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _disk_full_is_reported(tmp, path):
        save_file(trainable_state(model), str(tmp / "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng or rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        torch.save(methods or {}, tmp / "methods.pt")
        _write_manifest(tmp)
        _publish(tmp, path, keep)
    return path


class _disk_full_is_reported:
    """Around a checkpoint's writes: any failure removes the partial folder; a full disk (ENOSPC, or
    torch's "unexpected pos" from its zip writer) becomes a one-line RunDirError."""

    def __init__(self, tmp: Path, path: Path):
        self.tmp, self.path = tmp, path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None:
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        text = str(error)
        full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "unexpected pos" in text \
            or "No space left" in text
        if full:
            latest = latest_checkpoint(self.path.parent.parent)
            raise RunDirError(f"disk full: could not write checkpoint {self.path.name} in {self.path.parent} (the "
                              f"partial one was removed; {latest.name if latest else 'no checkpoint'} stays the "
                              "latest): free some space, then --resume") from None
        return False


def _write_manifest(folder: Path) -> None:
    """Every file's size, synced to disk, then the manifest itself: written last, it marks the folder complete."""
    sizes = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(f.relative_to(folder))] = f.stat().st_size
    _write_synced(folder / MANIFEST, json.dumps({"files": sizes}, indent=1))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, path: Path, keep: int) -> None:
    """Rename the finished folder into place, point `latest` at it (atomically), then prune."""
    root = path.parent
    aside = None
    if path.exists():  # the same step saved again: keep the old one until the new one is in place
        aside = root / f".old_{path.name}"
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
    tmp.rename(path)
    _write_synced(root / "latest.tmp", path.name)
    os.replace(root / "latest.tmp", root / "latest")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    for old in sorted(p for p in root.glob("step_*") if p != path)[:-(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (naming the file), or None when it is intact."""
    if not path.is_dir():
        return "missing"
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{manifest} is corrupt"
        for name, size in files.items():
            f = path / name
            if not f.exists():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} is truncated ({f.stat().st_size} of {size} bytes)"
    else:  # written before manifests: the files must be there
        weights = path / "sharded" if (path / "sharded").exists() else path / "weights.safetensors"
        for f in (weights, path / "state.json") + (() if weights.name == "sharded" else (path / "optimizer.pt",)):
            if not f.exists() or (f.is_file() and f.stat().st_size == 0):
                return f"{f} is missing or empty"
    try:
        json.loads((path / "state.json").read_text())["step"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"{path / 'state.json'} is corrupt"
    return None


def checkpoint_candidates(out_dir: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints to try, newest first (the one `latest` names leading), and what is wrong with
    the `latest` marker itself."""
    root = out_dir / "checkpoints"
    marker = root / "latest"
    notes, named = [], None
    if marker.exists():
        name = marker.read_text().strip()
        if not name:
            notes.append(f"{marker} is empty")
        elif not (root / name).is_dir() or "/" in name:
            notes.append(f"{marker} names {name!r}, which does not exist")
        else:
            named = root / name
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    return ([named] if named else []) + [p for p in steps if p != named], notes


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint, or None. `Loop.resume` walks the same candidates itself, to warn
    about the broken ones and to fall back past one that fails to load."""
    candidates, _ = checkpoint_candidates(out_dir)
    return next((p for p in candidates if checkpoint_problem(p) is None), None)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    load_trainable_state(model, load_file(str(path / "weights.safetensors")), source=str(path))
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    restore_rng(rng)
    state = json.loads((path / "state.json").read_text())
    methods = path / "methods.pt"
    state["methods"] = torch.load(methods, weights_only=False) if methods.exists() else {}
    return state


# -- sharded checkpoints (forkrl train --nproc N): torch.distributed.checkpoint, one folder for all ranks
def save_sharded_checkpoint(out_dir: Path, step: int, root, optimizer, scheduler, dp, keep: int = 2,
                            methods: dict | None = None, rng: dict | None = None, state: dict | None = None) -> Path:
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
        with _disk_full_is_reported(tmp, path):
            (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": dp.world, **(state or {})}, indent=1))
            _write_manifest(tmp)
            _publish(tmp, path, keep)
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
    restore_rng(mine["rng"])
    state["methods"] = mine["methods"]
    return state
