"""Scale-out on Ray: decoupled rollout workers and learner, bounded staleness, SAPO swarms.

Ray places the processes and carries the data (actor calls, its object store); forkrl adds only the
policy of who samples what with which weights:

- `DecoupledRun` (`forkrl train --ray`): N `RolloutWorker` actors (a `Collector` each: engine +
  sampler + env + task, no optimizer) and one `LearnerActor` running the ordinary `Loop`, whose batch
  source is the workers' client (`RayRollouts`). Prompts are handed out by a `PromptLedger` actor, so a worker that dies loses none.
- `SwarmRun` (`distributed.swarm.enabled`): SAPO, every peer the ordinary `Loop` of its own, whose
  source shares groups with the other peers through a `SwarmBoard` actor.

Nothing else in forkrl imports this package (DESIGN.md); the CLI does.
"""
from __future__ import annotations


def require_ray():
    """The `ray` module, or an error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise ImportError("decoupled and swarm runs need Ray: pip install 'forkrl[ray]' (or pip install ray)") from None
    return ray


def launch(cfg, resume: bool = False) -> dict:
    """Run `cfg` on Ray, decoupled or as a swarm; returns the run summary."""
    if cfg.distributed.swarm.enabled:
        from forkrl.distributed.swarm import SwarmRun
        return SwarmRun(cfg).train(resume=resume)
    from forkrl.distributed.decoupled import DecoupledRun
    run = DecoupledRun(cfg)
    try:
        return run.train(resume=resume)
    finally:
        run.shutdown()


__all__ = ["launch", "require_ray"]
