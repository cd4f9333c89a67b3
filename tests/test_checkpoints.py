"""Checkpoints that never silently restart: every broken file falls back to the newest intact
checkpoint (naming what is broken) and the resumed run repeats the uninterrupted one exactly, or the
run stops with one line naming the files; a full disk says so and leaves nothing partial behind;
--resume applies the settings that can change and refuses the ones that cannot."""
import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest

import forkrl.train.checkpoint as checkpoint
from forkrl.errors import RunDirError, UserError
from forkrl.train import Trainer
from tests.test_trainer import _cfg, _rows

STEPS = {"steps": 4, "checkpoint_every": 1, "mini_batches": 2}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _cfg(tmp, "straight", train=STEPS)
    Trainer(cfg).train()
    return _rows(cfg)


def _stopped_after_step_3(tmp_path):
    """A run stopped as Ctrl-C stops it after step 3: checkpoints step_000002 and step_000003 kept."""
    cfg = _cfg(tmp_path, "run", train=STEPS)
    first = Trainer(cfg)
    first.loop.on_step.append(lambda loop, step, metrics: step == 3 and loop.request_stop())
    with pytest.raises(KeyboardInterrupt):
        first.train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003"]
    return cfg, root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKAGES = {
    "truncated weights": (lambda root: _truncate(root / "step_000003" / "weights.safetensors"), "weights.safetensors is truncated"),
    "truncated optimizer": (lambda root: _truncate(root / "step_000003" / "optimizer.pt"), "optimizer.pt is truncated"),
    "truncated state": (lambda root: _truncate(root / "step_000003" / "state.json"), "state.json is truncated"),
    "truncated methods": (lambda root: _truncate(root / "step_000003" / "methods.pt"), "methods.pt is truncated"),
    "empty latest": (lambda root: (root / "latest").write_text(""), "latest is empty"),
    "dangling latest": (lambda root: (root / "latest").write_text("step_000009"), "names 'step_000009', which does not exist"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_checkpoint_falls_back_to_the_newest_intact_one_exactly(tmp_path, straight, breakage, caplog):
    cfg, root = _stopped_after_step_3(tmp_path)
    breaks, named = BREAKAGES[breakage]
    breaks(root)
    with caplog.at_level(logging.WARNING, logger="forkrl"):
        resumed = Trainer(cfg)
        resumed.train(resume=True)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert named in warning, warning
    if "latest" not in breakage:   # the broken step_3 is passed over: step 3 is redone from step 2
        assert "resuming from" in warning and "step_000002" in warning
    assert _rows(cfg) == straight


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes_exactly(tmp_path, straight):
    cfg, _ = _stopped_after_step_3(tmp_path)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/mean": 0.12')       # a crash in the middle of a write
    Trainer(cfg).train(resume=True)
    assert _rows(cfg) == straight


def test_no_intact_checkpoint_is_one_line_naming_the_files(tmp_path):
    cfg, root = _stopped_after_step_3(tmp_path)
    _truncate(root / "step_000002" / "weights.safetensors")
    _truncate(root / "step_000003" / "optimizer.pt")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError) as e:
        Trainer(cfg).train(resume=True)
    message = str(e.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert "step_000003/optimizer.pt is truncated" in message and "step_000002/weights.safetensors is truncated" in message
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics      # nothing deleted


class Killed(BaseException):
    """kill -9, as far as the code under test can tell: nothing after it runs."""


def test_a_kill_inside_the_final_save_resumes_from_the_last_complete_checkpoint(tmp_path, straight, monkeypatch):
    cfg = _cfg(tmp_path, "run", train={**STEPS, "checkpoint_every": 2})
    real_replace = checkpoint.os.replace

    def replace(src, dst):
        if str(dst).endswith("latest") and "step_000004" in open(src).read():
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Killed):
        Trainer(cfg).train()
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000002"
    Trainer(cfg).train(resume=True)
    assert _rows(cfg) == straight


def test_the_same_step_saved_again_keeps_a_complete_checkpoint_throughout(tmp_path, monkeypatch):
    """Re-saving step N moves the old folder aside before the new one lands: a crash between the two
    renames leaves `latest` dangling and step N-1 intact, which resume finds."""
    import torch
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, opt, sched, {})
    real_rename = checkpoint.Path.rename
    calls = []

    def rename(self, target):
        calls.append(target)
        if len(calls) == 2:   # after step_000002 was moved aside, before the new one is renamed in
            raise Killed
        return real_rename(self, target)

    monkeypatch.setattr(checkpoint.Path, "rename", rename)
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(tmp_path, 2, model, opt, sched, {})
    monkeypatch.setattr(checkpoint.Path, "rename", real_rename)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000001"


def test_disk_full_is_reported_and_the_partial_checkpoint_removed(tmp_path):
    """A real full disk: a 1 MB tmpfs in a private mount namespace (root only)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root)")
    mount = tmp_path / "small"
    mount.mkdir()
    script = textwrap.dedent(f"""
        import subprocess, sys, torch
        from pathlib import Path
        from forkrl.train.checkpoint import save_checkpoint
        from forkrl.errors import RunDirError
        out = Path({str(mount)!r})
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        save_checkpoint(out, 1, model, opt, sched, {{}})           # fits
        big = torch.nn.Linear(512, 512)                             # 1 MB of weights: does not
        opt = torch.optim.AdamW(big.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        try:
            save_checkpoint(out, 2, big, opt, sched, {{}})
        except RunDirError as e:
            print("ERROR", e)
        print("LEFT", sorted(p.name for p in (out / "checkpoints").iterdir()))
        print("LATEST", (out / "checkpoints" / "latest").read_text())
    """)
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount} && "
                          f"{sys.executable} -c \"$0\"", script], capture_output=True, text=True, timeout=120,
                         cwd=str(checkpoint.Path(__file__).parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["ERROR"].startswith("disk full: could not write checkpoint step_000002"), lines
    assert "step_000001 stays the latest" in lines["ERROR"]
    assert lines["LEFT"] == "['latest', 'step_000001']" and lines["LATEST"] == "step_000001"


def test_resume_applies_a_new_learning_rate_from_that_step_and_records_it(tmp_path, caplog):
    cfg = _cfg(tmp_path, "run", train={**STEPS, "checkpoint_every": 2})
    first = Trainer(cfg)
    first.loop.on_step.append(lambda loop, step, metrics: step == 2 and loop.request_stop())
    with pytest.raises(KeyboardInterrupt):
        first.train()
    changed = _cfg(tmp_path, "run", train={**STEPS, "checkpoint_every": 2, "lr": 2.5e-3})
    resumed = Trainer(changed)
    seen = []
    resumed.loop.on_step.append(lambda loop, step, m: seen.append((step, loop.learner.optimizer.param_groups[0]["lr"])))
    with caplog.at_level(logging.WARNING, logger="forkrl"):
        resumed.train(resume=True)
    assert seen == [(3, 2.5e-3), (4, 2.5e-3)]
    assert "train.lr 0.01 -> 0.0025" in caplog.text
    record = json.loads((tmp_path / "run" / "resumes.jsonl").read_text())
    assert record["step"] == 2 and record["changed"]["train.lr"] == [0.01, 0.0025]
    assert "lr: 0.0025" in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_refuses_a_change_the_checkpoint_depends_on(tmp_path):
    cfg = _cfg(tmp_path, "run", train={**STEPS, "steps": 2})
    Trainer(cfg).train()
    before = (tmp_path / "run" / "config.yaml").read_text()
    other_seed = _cfg(tmp_path, "run", train={**STEPS, "steps": 4})
    other_seed.seed = 7
    with pytest.raises(UserError, match=r"--resume cannot change seed \(0 -> 7\)"):
        Trainer(other_seed).train(resume=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == before
