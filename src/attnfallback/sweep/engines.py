"""The engines a job or a sweep runs on, and the one dispatch to them.

    run_score_engine(job, "local")                       # scoring.job.run_score, in this process
    run_score_engine(job, "ray", address=..., actors=4)  # ray_engine.run_score_ray, on a Ray cluster
    run_sweep_engine(config, "local")                    # local.run_local: one process per shard
    run_sweep_engine(config, "ray")                      # ray_engine.run_sweep_ray

`score --engine` and `sweep --engine` both come through here; the engines' own modules know
nothing of each other. Nothing heavy is imported until an engine runs.
"""

from __future__ import annotations

from attnfallback.errors import UnknownNameError, UsageError

ENGINES = ("local", "ray")


def check_engine(engine: str, address: str | None = None) -> None:
    """`engine` is one of ENGINES (else an UnknownNameError listing them); `ray` needs Ray installed
    and `address` needs `ray` (each else a UsageError, exit 2). Checked before anything is read."""
    if engine not in ENGINES:
        raise UnknownNameError("engine", engine, ENGINES)
    if engine == "ray":
        from attnfallback.sweep.ray_engine import require_ray

        require_ray()
    elif address is not None:
        raise UsageError("--address needs --engine ray")


def run_score_engine(job, engine: str = "local", address: str | None = None, actors: int | str = "auto"):
    """`score --engine local|ray`: run_score(job) here, or run_score_ray on a Ray cluster; returns
    the ScoreResult."""
    check_engine(engine, address)
    if engine == "ray":
        from attnfallback.sweep.ray_engine import run_score_ray

        return run_score_ray(job, address=address, actors=actors)
    from attnfallback.scoring.job import run_score

    return run_score(job)


def run_sweep_engine(config, engine: str = "local", resume: bool = False, address: str | None = None, echo=None):
    """`sweep --engine local|ray`: run_local(config) on this machine, or run_sweep_ray on a Ray
    cluster; returns the SweepResult (failed shards included, not raised)."""
    check_engine(engine, address)
    if engine == "ray":
        from attnfallback.sweep.ray_engine import run_sweep_ray

        return run_sweep_ray(config, resume=resume, address=address, echo=echo)
    from attnfallback.sweep.local import run_local

    return run_local(config, resume=resume, echo=echo)
