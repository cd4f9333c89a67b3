"""Where per-step metrics go: a jsonl file always, TensorBoard when installed, wandb when configured."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from forkrl.metrics.names import rename

log = logging.getLogger(__name__)


def _clean(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class JsonlSink:
    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and path.exists():
            # a resumed run continues the file from its checkpoint, dropping steps it will redo
            rows = []
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line torn by a crash mid-write (or blank): the step is redone anyway
                    if line.strip():
                        log.warning("%s:%d: dropping a line that is not complete JSON", path, lineno)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= keep_until_step))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.f = path.open("a")

    def write(self, step: int, metrics: dict) -> None:
        self.f.write(json.dumps({"step": step, **_clean(metrics)}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(logdir))

    def write(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, name: str, config: dict, run_id: str):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("log.wandb_project is set but wandb is not installed: pip install 'forkrl[wandb]'") from e
        self.run = wandb.init(project=project, name=name, config=config, id=run_id, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Renamed:
    """A sink that receives metrics under another framework's names (log.metric_names)."""

    def __init__(self, sink, scheme: str, reward_names: set[str], task: str):
        self.sink, self.scheme, self.reward_names, self.task = sink, scheme, reward_names, task

    def write(self, step: int, metrics: dict) -> None:
        self.sink.write(step, rename(metrics, self.scheme, self.reward_names, self.task))

    def close(self) -> None:
        self.sink.close()


def make_sinks(out_dir: Path, cfg, resume_step: int | None) -> list:
    """metrics.jsonl always (forkrl's names: the report reads it); TensorBoard and wandb under
    log.metric_names. A resumed run appends to the same TensorBoard folder and wandb run."""
    sinks: list = [JsonlSink(out_dir / "metrics.jsonl", resume_step)]
    dashboards: list = []
    if cfg.log.tensorboard:
        try:
            dashboards.append(TensorBoardSink(out_dir / "tensorboard"))
        except ImportError:
            log.info("tensorboard not installed; metrics go to metrics.jsonl only")
    if cfg.log.wandb_project:
        dashboards.append(WandbSink(cfg.log.wandb_project, cfg.name, cfg.model_dump(), run_id=wandb_run_id(out_dir, fresh=resume_step is None)))
    if cfg.log.metric_names != "forkrl":
        names = {r.name if r.name != "correct" or not r.function else r.function.rsplit(":", 1)[-1]
                 for r in cfg.task.rewards}
        task = cfg.task.dataset or cfg.name
        dashboards = [Renamed(d, cfg.log.metric_names, names, task) for d in dashboards]
    return sinks + dashboards


def wandb_run_id(out_dir: Path, fresh: bool) -> str:
    """The run's wandb id, kept in OUTPUT/wandb_id so --resume continues the same wandb run."""
    path = out_dir / "wandb_id"
    if path.exists() and not fresh:
        return path.read_text().strip()
    import secrets
    run_id = secrets.token_hex(4)
    path.write_text(run_id)
    return run_id


class SampleLog(JsonlSink):
    """A few sampled completions per step, token by token with their entropies, for `forkrl report`
    (samples.jsonl; a resumed run drops the steps it redoes, as metrics.jsonl does)."""

    def write(self, step: int, samples: list[dict]) -> None:  # type: ignore[override]
        for s in samples:
            self.f.write(json.dumps({"step": step, **s}) + "\n")
        self.f.flush()
