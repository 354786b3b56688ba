"""The engines a shard or a sweep runs on: `local` (this process; a sweep: a process per shard)
and `ray` (actors on a Ray cluster). One place that dispatches, so the command line and the sweep
name the same engines."""

from __future__ import annotations

from attnfallback.errors import UnknownNameError, UsageError
from attnfallback.scoring.job import run_score
from attnfallback.sweep.config import load_config
from attnfallback.sweep.local import run_local
from attnfallback.sweep.ray_engine import require_ray, run_score_ray, run_sweep_ray

ENGINES = ("local", "ray")


def check_engine(engine: str) -> str:
    """`engine` if it is one of ENGINES, else an UnknownNameError (exit 2) naming them."""
    if engine not in ENGINES:
        raise UnknownNameError("engine", engine, ENGINES)
    return engine


def run_score_engine(job, engine: str = "local", address: str | None = None, actors: int | str = "auto"):
    """`score --engine local|ray`: run_score(job) here, or run_score_ray on a Ray cluster."""
    if check_engine(engine) == "ray":
        return run_score_ray(job, address=address, actors=actors)
    if address is not None:
        raise UsageError("--address needs --engine ray")
    return run_score(job)


def run_sweep_engine(config_path: str, resume: bool = False, engine: str = "local", address: str | None = None,
                     echo=None):
    """`sweep --engine local|ray`: the sweep a TOML file describes; returns the SweepResult (failed
    shards included). Ray's absence is an error before anything is read or written."""
    if check_engine(engine) == "ray":
        require_ray()
    elif address is not None:
        raise UsageError("--address needs --engine ray")
    config = load_config(config_path)
    if engine == "ray":
        return run_sweep_ray(config, resume=resume, address=address, echo=echo)
    return run_local(config, resume=resume, echo=echo)
