"""Sweeps: every configuration x shard of an evaluation grid, on this machine or on a Ray cluster.

    from attnfallback.sweep import load_config, run_local
    result = run_local(load_config("sweep.toml"))
    result.exit_code, result.failed, result.merged, result.summary

The Ray engine (`run_sweep_ray`, `run_score_ray`) needs the optional extra `attnfallback[ray]`.
Nothing is imported until a name is used.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "SweepConfig": "attnfallback.sweep.config",
    "JobSpec": "attnfallback.sweep.config",
    "SweepJob": "attnfallback.sweep.config",
    "load_config": "attnfallback.sweep.config",
    "parse_config": "attnfallback.sweep.config",
    "run_local": "attnfallback.sweep.local",
    "SweepResult": "attnfallback.sweep.local",
    "JobResult": "attnfallback.sweep.local",
    "run_sweep_ray": "attnfallback.sweep.ray_engine",
    "run_score_ray": "attnfallback.sweep.ray_engine",
    "ray_available": "attnfallback.sweep.ray_engine",
    "ENGINES": "attnfallback.sweep.engines",
    "run_score_engine": "attnfallback.sweep.engines",
    "run_sweep_engine": "attnfallback.sweep.engines",
    "run_demo": "attnfallback.sweep.demo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnfallback.sweep' has no attribute {name!r}")
    return getattr(import_module(module), name)
